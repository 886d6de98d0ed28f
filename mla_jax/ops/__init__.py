"""Pure jnp functions, each fast path beside the slow reference twin that tests compare it with."""
