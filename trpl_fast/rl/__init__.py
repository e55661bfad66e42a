"""The training stack: vectorized environments (EnvPool / Gymnasium, and the 5-link sparse
Reacher), advantage estimation, normalizers, policies, losses, TRPO, the training loop,
plots and the contextual-covariance experiment."""
