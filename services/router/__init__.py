"""The router: the public qlm.v1.Router API. Stateless; run as many as you like."""
