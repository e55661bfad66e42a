"""The training stack (issue 4, in progress): advantage estimation, normalizers and the
policy-gradient losses used by the on-policy training loop."""
