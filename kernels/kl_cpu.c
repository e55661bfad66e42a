/* The KL projection on the CPU, one state at a time (MATH.md "KL covariance projection"),
 * for full and diagonal covariances, compiled on first use by kernels/kl_cpu.py and called
 * through ctypes. Rows [begin, end) of a batch per call: the launcher splits a batch
 * across threads.
 *
 * FULL COVARIANCE: the algorithm of the fused Triton kernel (kernels/kl_full.py) as plain
 * C, float64 throughout, on row-major means and factors read in place at any strides.
 *
 * Forward, per state (lower factors S = C C^T, S_o = C_o C_o^T; only lower triangles read):
 *   1. mean part: y = C_o^-T C_o^-1 (mu - mu_o), maha = <mu - mu_o, y>, scaled back onto
 *      0.5 maha = eps_mu when outside;
 *   2. A = C^-1 C_o (forward substitution), M = A^T A (the whitened target precision);
 *   3. the eigenvalues m of M: Householder reduction to a tridiagonal T, then implicit
 *      symmetric QR steps with Wilkinson's shift (Golub & Van Loan, Algorithms 8.3.1-8.3.3);
 *      ascending. Absolute error ~ u ||M||, what any eigen-solver of the formed M achieves;
 *   4. the safeguarded Newton on log KLc(t) - log eps of the torch path (ops/kl.py
 *      _newton_start, _newton_step) on r = max(m - 1, -1);
 *   5. G = I + t (M - I) = U U^T (reverse Cholesky, U upper), chol(S_t) = C_o U^-T.
 * Outputs: mean_t, chol_t, t, converged, m, U^-1 (the torch factor path's outputs).
 *
 * Backward (the factor path's implicit gradient, ops/kl.py _kl_full_factor_backward):
 *   X = C_o U^-T, Phi = Phi(X^T Xbar), H = sym(Phi), Z = I - U^-1 U^-T,
 *   W = (<H, Z> / <Z, Z>) Z - H, V = C^-1 X, Cbar = tril(-2 t C^-T V W V^T).
 *
 * A state whose Newton solve does not meet the tolerance is reported (converged = 0) with t
 * the lower end of its bracket (KLc(t) <= eps); a state whose M is not finite, whose eigen
 * iteration does not settle, or whose G does not factor gets t = 0 (the old factor),
 * reported too.
 *
 * DIAGONAL (the torch path's kl_diag / kl_diag_backward of ops/kl.py, per row): the mean
 * part with L_o = diag(1 / v_o); r_i = v_o_i / v_i - 1 as ((sd_o - sd) / sd) ((sd_o + sd) / sd);
 * the same Newton; sd_t = sd_o / sqrt(1 + t r). Backward: the implicit gradient in x = t r,
 * g = 1 + x (no r^2 to overflow). Computed in float64 for float32 and float64 storage
 * (contiguous (rows, d) arrays of either, `f32` says which; outputs in the storage dtype);
 * with float32 storage a row whose ratio overflows float32 is projected to the old std
 * with t = 0 and reported, forward and backward, as the float32 torch solve treats it
 * (infinitely far). Solving in float64 also converges float32 rows that the float32 solve
 * would flag (t below float32's normal range).
 *
 * Numeric constants come from the caller (one home: ops/kl.py, kernels/kl.py).
 */
#include <math.h>
#include <stdint.h>

#define MAXD 32
#define IDX(i, j) ((i) * d + (j))

typedef struct {
    int max_iter;             /* Newton iterations at most */
    double tol;               /* |log KLc(t) - log eps| that ends a solve */
    double phi_cut;           /* |x| below which phi(x) is taken from its series */
    int n_series;             /* coefficients of phi's series, highest first */
    const double *phi_series;
    int qr_max_steps;         /* implicit QR steps per eigenvalue at most */
} kl_params;

static double kl_phi(double x, const kl_params *p) {
    /* log1p(x) - x / (1 + x) without cancellation: x^2 P(x) near 0 */
    if (fabs(x) < p->phi_cut) {
        double s = x * p->phi_series[0] + p->phi_series[1];
        for (int k = 2; k < p->n_series; k++) s = s * x + p->phi_series[k];
        return x * x * s;
    }
    return log1p(x) - x / (1.0 + x);
}

/* KLc(1) = 0.5 sum phi(r_i); a ratio at or below -1, infinite or NaN is infinitely far */
static double kl_at_one(const double *r, int d, const kl_params *p) {
    double s = 0.0;
    for (int i = 0; i < d; i++) {
        if (!(r[i] > -1.0 && r[i] < INFINITY)) return INFINITY;
        s += kl_phi(r[i], p);
    }
    return 0.5 * s;
}

/* The safeguarded Newton of ops/kl.py (kl_dual_newton, early exit) on one row of ratios.
 * Returns converged; writes t. */
static int kl_dual_newton(const double *r_in, int d, double eps, const kl_params *p, double *t_out, int *active_out) {
    double r[MAXD];
    int active = kl_at_one(r_in, d, p) > eps;
    int solvable = 1;
    for (int i = 0; i < d; i++) solvable &= r_in[i] < INFINITY;
    double big = 0.0;
    for (int i = 0; i < d; i++) {
        r[i] = solvable ? r_in[i] : 0.0;
        big = fmax(big, fabs(r[i]));
    }
    *active_out = active;
    if (!active) {
        *t_out = 1.0;
        return solvable;
    }
    if (!solvable) { /* a ratio overflowed: the old factor, reported */
        *t_out = 0.0;
        return 0;
    }
    if (!(big > 0.0)) big = 1.0;
    double ss = 0.0;
    for (int i = 0; i < d; i++) ss += (r[i] / big) * (r[i] / big);
    double norm = big * sqrt(ss);
    double t = fmin(2.0 * sqrt(eps) / (norm > 0.0 ? norm : 1.0), 1.0);
    double lo = 0.0, hi = 1.0;
    int done = 0;
    for (int it = 0; it < p->max_iter && !done; it++) {
        double kl = 0.0, s2 = 0.0;
        for (int i = 0; i < d; i++) {
            double x = t * r[i], q = x / (1.0 + x);
            kl += kl_phi(x, p);
            s2 += q * q;
        }
        kl *= 0.5;
        int pos = kl > 0.0; /* KLc underflowed to 0 (t far too small): bisect */
        double h = log((pos ? kl : eps) / eps);
        if (pos && fabs(h) <= p->tol) {
            done = 1;
            break;
        }
        if (!(kl <= eps)) hi = t; /* a NaN moves the upper end: lo keeps KLc(lo) <= eps */
        else lo = t;
        double t_new = t - 2.0 * t * h * kl / (s2 > 0.0 ? s2 : 1.0);
        t = (pos && t_new > lo && t_new < hi) ? t_new : 0.5 * (lo + hi);
    }
    done &= solvable;
    *t_out = done ? t : (solvable ? lo : 0.0);
    return done;
}

/* Givens rotation (c, s) with s a + c b = 0 (Golub & Van Loan 5.1.8) */
static void givens(double a, double b, double *c, double *s) {
    if (b == 0.0) {
        *c = 1.0;
        *s = 0.0;
    } else if (fabs(b) > fabs(a)) {
        double tau = -a / b;
        *s = 1.0 / sqrt(1.0 + tau * tau);
        *c = *s * tau;
    } else {
        double tau = -b / a;
        *c = 1.0 / sqrt(1.0 + tau * tau);
        *s = *c * tau;
    }
}

/* Householder reduction of the symmetric d x d matrix a (destroyed) to a tridiagonal:
 * diag[0..d-1], sub[k] = T[k+1, k] (k < d-1). Step k zeroes column k below the subdiagonal;
 * the loops run along rows (contiguous, vectorized). */
static void tridiagonalize(double *a, int d, double *diag, double *sub) {
    double v[MAXD], w[MAXD];
    for (int k = 0; k + 2 < d; k++) {
        const int o = k + 1, n = d - o; /* the trailing block o .. d-1 */
        double big = 0.0;
        for (int i = 0; i < n; i++) big = fmax(big, fabs(a[IDX(o + i, k)]));
        if (big == 0.0) continue; /* already reduced */
        double norm2 = 0.0;
        for (int i = 0; i < n; i++) {
            v[i] = a[IDX(o + i, k)] / big; /* the reflector is invariant to scale */
            norm2 += v[i] * v[i];
        }
        double alpha = v[0] < 0.0 ? sqrt(norm2) : -sqrt(norm2); /* no cancellation in v_0 */
        v[0] -= alpha;
        double vv = 0.0;
        for (int i = 0; i < n; i++) vv += v[i] * v[i];
        double beta = 2.0 / vv;
        /* p = beta B v (B symmetric: a sum of its rows), w = p - 0.5 beta (p.v) v,
         * B -= v w^T + w v^T */
        for (int j = 0; j < n; j++) w[j] = 0.0;
        for (int i = 0; i < n; i++) {
            const double *row = a + IDX(o + i, o), vi = beta * v[i];
            for (int j = 0; j < n; j++) w[j] += vi * row[j];
        }
        double pv = 0.0;
        for (int i = 0; i < n; i++) pv += w[i] * v[i];
        for (int i = 0; i < n; i++) w[i] -= 0.5 * beta * pv * v[i];
        for (int i = 0; i < n; i++) {
            double *row = a + IDX(o + i, o);
            const double vi = v[i], wi = w[i];
            for (int j = 0; j < n; j++) row[j] -= vi * w[j] + wi * v[j];
        }
        a[IDX(o, k)] = alpha * big;
    }
    for (int i = 0; i < d; i++) diag[i] = a[IDX(i, i)];
    for (int i = 0; i + 1 < d; i++) sub[i] = a[IDX(i + 1, i)];
}

/* an off-diagonal below u (|T_kk| + |T_k+1,k+1|) counts as zero (deflation) */
static int negligible(const double *diag, const double *sub, int k) {
    const double u = 1.1102230246251565e-16;
    return fabs(sub[k]) <= u * (fabs(diag[k]) + fabs(diag[k + 1])) || fabs(sub[k]) < 1e-300;
}

#define GROUP 4

/* The eigenvalues of GROUP (or fewer: `count`) tridiagonals at once, in place (diag ends
 * holding them, unsorted): implicit symmetric QR steps with Wilkinson's shift (Golub & Van
 * Loan, Algorithm 8.3.2) on the unreduced block ending at each matrix's hi. The matrices'
 * rotations are interleaved, one each per round: a rotation is a chain of a division, a
 * square root and a division, and the chains of different matrices overlap in the core.
 * ok[g] = 0 where a matrix did not settle within `budget` steps. */
static void tridiagonal_eigvals(int count, int d, double diag[][MAXD], double sub[][MAXD], int *ok, int budget) {
    int hi[GROUP], lo[GROUP], k[GROUP], steps[GROUP], live = 0;
    double x[GROUP], z[GROUP];
    for (int g = 0; g < count; g++) {
        hi[g] = d - 1;
        k[g] = -1; /* not inside a chase */
        steps[g] = 0;
        ok[g] = 1;
        live += hi[g] > 0;
    }
    while (live > 0) {
        for (int g = 0; g < count; g++) {
            double *dg = diag[g], *sg = sub[g];
            if (hi[g] <= 0) continue;
            if (k[g] < 0) { /* between chases: deflate, then start the next one */
                while (hi[g] > 0 && negligible(dg, sg, hi[g] - 1)) {
                    sg[hi[g] - 1] = 0.0;
                    hi[g]--;
                }
                if (hi[g] == 0 || ++steps[g] > budget) {
                    ok[g] = hi[g] == 0;
                    hi[g] = 0;
                    live--;
                    continue;
                }
                int l = hi[g] - 1;
                while (l > 0 && !negligible(dg, sg, l - 1)) l--;
                lo[g] = l;
                double dd = 0.5 * (dg[hi[g] - 1] - dg[hi[g]]), b = sg[hi[g] - 1];
                double mu = dg[hi[g]] - b * b / (dd + (dd < 0.0 ? -1.0 : 1.0) * hypot(dd, b));
                x[g] = dg[l] - mu;
                z[g] = sg[l];
                k[g] = l;
            }
            /* one rotation in the plane (kk, kk+1) of this matrix's chase */
            const int kk = k[g];
            double c, s;
            givens(x[g], z[g], &c, &s);
            if (kk > lo[g]) sg[kk - 1] = c * sg[kk - 1] - s * z[g]; /* z was the bulge at (kk+1, kk-1) */
            const double ak = dg[kk], ak1 = dg[kk + 1], bk = sg[kk];
            dg[kk] = c * c * ak - 2.0 * c * s * bk + s * s * ak1;
            dg[kk + 1] = s * s * ak + 2.0 * c * s * bk + c * c * ak1;
            sg[kk] = c * s * (ak - ak1) + (c * c - s * s) * bk;
            if (kk + 1 < hi[g]) {
                x[g] = sg[kk];
                z[g] = -s * sg[kk + 1]; /* the new bulge at (kk+2, kk) */
                sg[kk + 1] *= c;
                k[g] = kk + 1;
            } else {
                k[g] = -1;
            }
        }
    }
}

static void sort_ascending(double *m, int d) {
    for (int i = 1; i < d; i++) { /* insertion sort: d <= 32 */
        double key = m[i];
        int j = i - 1;
        while (j >= 0 && m[j] > key) {
            m[j + 1] = m[j];
            j--;
        }
        m[j + 1] = key;
    }
}

/* x = L^-1 b for lower-triangular L (d x d) and a vector b */
static void solve_lower_vec(const double *l, const double *b, double *x, int d) {
    for (int i = 0; i < d; i++) {
        double s = b[i];
        for (int k = 0; k < i; k++) s -= l[IDX(i, k)] * x[k];
        x[i] = s / l[IDX(i, i)];
    }
}

/* x = L^-T b */
static void solve_lower_t_vec(const double *l, const double *b, double *x, int d) {
    for (int i = 0; i < d; i++) x[i] = b[i];
    for (int i = d - 1; i >= 0; i--) {
        x[i] /= l[IDX(i, i)];
        for (int k = 0; k < i; k++) x[k] -= l[IDX(i, k)] * x[i];
    }
}

/* X = L^-1 B for lower-triangular L and B: X lower triangular (forward substitution by
 * rows: each row of X a combination of the rows above, vectorized along it) */
static void solve_lower_tri(const double *l, const double *b, double *x, int d) {
    for (int i = 0; i < d; i++) {
        double *xi = x + IDX(i, 0);
        for (int j = 0; j <= i; j++) xi[j] = b[IDX(i, j)];
        for (int j = i + 1; j < d; j++) xi[j] = 0.0;
        for (int k = 0; k < i; k++) {
            const double lik = l[IDX(i, k)], *xk = x + IDX(k, 0);
            for (int j = 0; j <= k; j++) xi[j] -= lik * xk[j];
        }
        const double inv = 1.0 / l[IDX(i, i)];
        for (int j = 0; j <= i; j++) xi[j] *= inv;
    }
}

/* S = A^T A for lower-triangular A, full symmetric (a sum of rank-1 updates by A's rows) */
static void gram_of_lower(const double *a, double *s, int d) {
    for (int i = 0; i < d * d; i++) s[i] = 0.0;
    for (int k = 0; k < d; k++) {
        const double *ak = a + IDX(k, 0);
        for (int i = 0; i <= k; i++) {
            double *si = s + IDX(i, 0);
            const double aki = ak[i];
            for (int j = 0; j <= k; j++) si[j] += aki * ak[j];
        }
    }
}

static void transpose(const double *a, double *at, int d) {
    for (int i = 0; i < d; i++)
        for (int j = 0; j < d; j++) at[IDX(j, i)] = a[IDX(i, j)];
}

/* a (batch, row, column) element-stride triple of a batch of d x d matrices: matrices come
 * in any layout (torch.linalg.cholesky returns column-major ones), read without a copy */
typedef struct {
    int64_t batch, row, col;
} strides3;

/* the lower triangle of matrix `index` of src, row-major into dst, zero above */
static void load_lower(const double *src, strides3 st, int64_t index, double *dst, int d) {
    const double *m = src + index * st.batch;
    for (int i = 0; i < d; i++)
        for (int j = 0; j < d; j++) dst[IDX(i, j)] = j <= i ? m[i * st.row + j * st.col] : 0.0;
}

/* prec_delta = L_o (mu - mu_o) = C_o^-T C_o^-1 delta; returns maha = <delta, prec_delta> */
static double mean_parts(const double *mu, const double *mu_o, const double *old_chol, double *delta,
                         double *prec_delta, int d) {
    double y[MAXD], maha = 0.0;
    for (int i = 0; i < d; i++) delta[i] = mu[i] - mu_o[i];
    solve_lower_vec(old_chol, delta, y, d);
    solve_lower_t_vec(old_chol, y, prec_delta, d);
    for (int i = 0; i < d; i++) maha += delta[i] * prec_delta[i];
    return maha;
}

/* X = C_o U^-T (lower triangular) from C_o lower and ut = U^-T lower */
static void projected_factor(const double *old_chol, const double *ut, double *x, int d) {
    for (int i = 0; i < d; i++) {
        double *xi = x + IDX(i, 0);
        for (int j = 0; j < d; j++) xi[j] = 0.0;
        for (int k = 0; k <= i; k++) {
            const double lik = old_chol[IDX(i, k)], *uk = ut + IDX(k, 0);
            for (int j = 0; j <= k; j++) xi[j] += lik * uk[j];
        }
    }
}

/* U upper with G = U U^T (columns from the last, each a rank-1 downdate of the leading
 * block: vectorized along rows); g (full symmetric) is destroyed. Returns 0 where a pivot
 * is not positive (G not positive definite in float64). */
static int reverse_cholesky(double *g, double *u, int d) {
    double c[MAXD];
    for (int i = 0; i < d * d; i++) u[i] = 0.0;
    for (int j = d - 1; j >= 0; j--) {
        const double s = g[IDX(j, j)];
        if (!(s > 0.0)) return 0;
        const double ujj = sqrt(s), inv = 1.0 / ujj;
        u[IDX(j, j)] = ujj;
        for (int i = 0; i < j; i++) u[IDX(i, j)] = c[i] = g[IDX(i, j)] * inv;
        for (int i = 0; i < j; i++) {
            double *gi = g + IDX(i, 0);
            const double ci = c[i];
            for (int l = 0; l < j; l++) gi[l] -= ci * c[l];
        }
    }
    return 1;
}

/* U^-1 (upper) by back substitution by rows */
static void invert_upper(const double *u, double *x, int d) {
    for (int i = d - 1; i >= 0; i--) {
        double *xi = x + IDX(i, 0);
        for (int j = 0; j < d; j++) xi[j] = j == i ? 1.0 : 0.0;
        for (int k = i + 1; k < d; k++) {
            const double uik = u[IDX(i, k)], *xk = x + IDX(k, 0);
            for (int j = k; j < d; j++) xi[j] -= uik * xk[j];
        }
        const double inv = 1.0 / u[IDX(i, i)];
        for (int j = i; j < d; j++) xi[j] *= inv;
    }
}

static void forward_rows(int64_t begin, int64_t end, int d, const double *mean, const double *factor,
                         const double *old_mean, const double *old_factor, const int64_t *matrix_strides,
                         const double *mean_bound,
                         int64_t mean_bound_stride, const double *cov_bound, int64_t cov_bound_stride,
                         int max_iter, double tol, double phi_cut, int n_series, const double *phi_series,
                         int qr_max_steps, double *mean_out, double *chol_out, double *t_out, uint8_t *conv_out,
                         double *eigvals_out, double *u_inv_out) {
    kl_params p = {max_iter, tol, phi_cut, n_series, phi_series, qr_max_steps};
    const strides3 fs = {matrix_strides[0], matrix_strides[1], matrix_strides[2]};
    const strides3 ofs = {matrix_strides[3], matrix_strides[4], matrix_strides[5]};
    double mm[GROUP][MAXD * MAXD], diag[GROUP][MAXD], sub[GROUP][MAXD];
    double chol[GROUP][MAXD * MAXD], old_chol[GROUP][MAXD * MAXD], a[MAXD * MAXD], g[MAXD * MAXD];
    double u[MAXD * MAXD], u_inv[MAXD * MAXD], ut[MAXD * MAXD], x[MAXD * MAXD];
    double delta[MAXD], prec_delta[MAXD], m[MAXD], r[MAXD];
    int finite[GROUP], eig_ok[GROUP];
    for (int64_t first = begin; first < end; first += GROUP) {
        const int count = end - first < GROUP ? (int)(end - first) : GROUP;
        /* 1. mean part; 2. M = A^T A, A = C^-1 C_o; its tridiagonal */
        for (int gi = 0; gi < count; gi++) {
            const int64_t row = first + gi, vb = row * d;
            load_lower(factor, fs, row, chol[gi], d);
            load_lower(old_factor, ofs, row, old_chol[gi], d);
            double maha = mean_parts(mean + vb, old_mean + vb, old_chol[gi], delta, prec_delta, d);
            double eps_mu = 2.0 * mean_bound[row * mean_bound_stride];
            int mean_active = maha > eps_mu;
            double scale = sqrt(eps_mu / (mean_active ? maha : eps_mu));
            for (int i = 0; i < d; i++)
                mean_out[vb + i] = mean_active ? old_mean[vb + i] + scale * delta[i] : mean[vb + i];
            solve_lower_tri(chol[gi], old_chol[gi], a, d);
            gram_of_lower(a, mm[gi], d);
            finite[gi] = 1;
            for (int i = 0; i < d * d; i++) finite[gi] &= isfinite(mm[gi][i]);
            for (int i = 0; i < d * d; i++) g[i] = finite[gi] ? mm[gi][i] : 0.0;
            tridiagonalize(g, d, diag[gi], sub[gi]);
        }
        /* 3. eigenvalues, the group's QR iterations interleaved */
        tridiagonal_eigvals(count, d, diag, sub, eig_ok, p.qr_max_steps * d);
        for (int gi = 0; gi < count; gi++) {
            const int64_t row = first + gi, vb = row * d, mb = vb * d;
            const double *mmg = mm[gi];
            for (int i = 0; i < d; i++) m[i] = finite[gi] && eig_ok[gi] ? diag[gi][i] : NAN;
            sort_ascending(m, d);
            /* 4. the Newton solve on r = max(m - 1, -1) (NaN stays NaN) */
            for (int i = 0; i < d; i++) r[i] = m[i] - 1.0 < -1.0 ? -1.0 : m[i] - 1.0;
            double t;
            int active;
            int conv = kl_dual_newton(r, d, cov_bound[row * cov_bound_stride], &p, &t, &active);
            /* 5. G = I + t (M - I) = U U^T (the identity for inactive rows and t = 0) */
            int factored = 0;
            if (active && t > 0.0) {
                for (int i = 0; i < d * d; i++) g[i] = t * mmg[i];
                for (int i = 0; i < d; i++) g[IDX(i, i)] += 1.0 - t;
                factored = reverse_cholesky(g, u, d);
                if (!factored) { /* G not positive definite in float64: the old factor, reported */
                    t = 0.0;
                    conv = 0;
                }
            }
            if (!factored) {
                for (int i = 0; i < d * d; i++) u[i] = 0.0;
                for (int i = 0; i < d; i++) u[IDX(i, i)] = 1.0;
            }
            invert_upper(u, u_inv, d);
            transpose(u_inv, ut, d);
            projected_factor(old_chol[gi], ut, x, d);
            const double *chol_t = active ? x : chol[gi];
            for (int i = 0; i < d * d; i++) {
                chol_out[mb + i] = chol_t[i];
                u_inv_out[mb + i] = u_inv[i];
            }
            for (int i = 0; i < d; i++) eigvals_out[vb + i] = m[i];
            t_out[row] = t;
            conv_out[row] = (uint8_t)conv;
        }
    }
}

static void backward_rows(int64_t begin, int64_t end, int d, const double *grad_mean, const double *grad_factor,
                          const double *mean, const double *factor, const double *old_mean,
                          const double *old_factor, const int64_t *matrix_strides, const double *t_in, const double *eigvals,
                          const double *u_inv_in, const double *mean_bound, int64_t mean_bound_stride,
                          const double *cov_bound, int64_t cov_bound_stride, double phi_cut, int n_series,
                          const double *phi_series, double *grad_mean_out, double *grad_factor_out) {
    kl_params p = {0, 0.0, phi_cut, n_series, phi_series, 0};
    const strides3 gs = {matrix_strides[0], matrix_strides[1], matrix_strides[2]};
    const strides3 fs = {matrix_strides[3], matrix_strides[4], matrix_strides[5]};
    const strides3 ofs = {matrix_strides[6], matrix_strides[7], matrix_strides[8]};
    double chol[MAXD * MAXD], old_chol[MAXD * MAXD], xbar[MAXD * MAXD], x[MAXD * MAXD], v[MAXD * MAXD];
    double h[MAXD * MAXD], z[MAXD * MAXD], ut[MAXD * MAXD], vw[MAXD * MAXD], vt[MAXD * MAXD];
    double y[MAXD * MAXD], cbar[MAXD * MAXD];
    double delta[MAXD], prec_delta[MAXD], r[MAXD];
    for (int64_t row = begin; row < end; row++) {
        const int64_t vb = row * d, mb = vb * d;
        load_lower(factor, fs, row, chol, d);
        load_lower(old_factor, ofs, row, old_chol, d);
        load_lower(grad_factor, gs, row, xbar, d);

        /* mean part: b g - (b / m) <g, delta> L_o delta on active rows */
        double maha = mean_parts(mean + vb, old_mean + vb, old_chol, delta, prec_delta, d);
        double eps_mu = 2.0 * mean_bound[row * mean_bound_stride];
        int mean_active = maha > eps_mu;
        double m_safe = mean_active ? maha : eps_mu, b = sqrt(eps_mu / m_safe), g_dot = 0.0;
        for (int i = 0; i < d; i++) g_dot += grad_mean[vb + i] * delta[i];
        for (int i = 0; i < d; i++)
            grad_mean_out[vb + i] =
                mean_active ? b * grad_mean[vb + i] - (b * g_dot / m_safe) * prec_delta[i] : grad_mean[vb + i];

        /* covariance part: active as the forward decided it, from its eigenvalues */
        for (int i = 0; i < d; i++) {
            double e = eigvals[vb + i] - 1.0;
            r[i] = e < -1.0 ? -1.0 : e;
        }
        if (!(kl_at_one(r, d, &p) > cov_bound[row * cov_bound_stride])) {
            for (int i = 0; i < d * d; i++) grad_factor_out[mb + i] = xbar[i];
            continue;
        }
        const double t = t_in[row];
        if (t == 0.0) { /* the forward returned the old factor: a constant */
            for (int i = 0; i < d * d; i++) grad_factor_out[mb + i] = 0.0;
            continue;
        }
        transpose(u_inv_in + mb, ut, d); /* U^-T, lower */
        projected_factor(old_chol, ut, x, d); /* X = C_o U^-T */
        /* H = sym(Phi(X^T Xbar)) (lower triangle of X^T Xbar, diagonal halved) */
        for (int i = 0; i < d * d; i++) h[i] = 0.0;
        for (int k = 0; k < d; k++) {
            const double *xk = x + IDX(k, 0), *bk = xbar + IDX(k, 0);
            for (int i = 0; i <= k; i++) {
                double *hi = h + IDX(i, 0);
                const double xki = xk[i];
                for (int j = 0; j <= i; j++) hi[j] += xki * bk[j];
            }
        }
        for (int i = 0; i < d; i++) {
            h[IDX(i, i)] *= 0.5;
            for (int j = 0; j < i; j++) h[IDX(j, i)] = h[IDX(i, j)] = 0.5 * h[IDX(i, j)];
        }
        /* Z = I - U^-1 U^-T; W = (<H, Z> / <Z, Z>) Z - H, kept in h */
        gram_of_lower(ut, z, d);
        double zz = 0.0, hz = 0.0;
        for (int i = 0; i < d * d; i++) {
            z[i] = -z[i];
            if (i % (d + 1) == 0) z[i] += 1.0;
            zz += z[i] * z[i];
            hz += h[i] * z[i];
        }
        const double c = hz / (zz > 0.0 ? zz : 1.0);
        for (int i = 0; i < d * d; i++) h[i] = c * z[i] - h[i];
        /* V = C^-1 X (lower), Y = V W V^T */
        solve_lower_tri(chol, x, v, d);
        for (int i = 0; i < d; i++) {
            double *vwi = vw + IDX(i, 0);
            for (int j = 0; j < d; j++) vwi[j] = 0.0;
            for (int k = 0; k <= i; k++) {
                const double vik = v[IDX(i, k)], *wk = h + IDX(k, 0);
                for (int j = 0; j < d; j++) vwi[j] += vik * wk[j];
            }
        }
        transpose(v, vt, d); /* upper */
        for (int i = 0; i < d; i++) {
            double *yi = y + IDX(i, 0);
            for (int j = 0; j < d; j++) yi[j] = 0.0;
            for (int k = 0; k < d; k++) {
                const double vwik = vw[IDX(i, k)], *vk = vt + IDX(k, 0);
                for (int j = k; j < d; j++) yi[j] += vwik * vk[j];
            }
        }
        /* Cbar = C^-T Y by back substitution by rows (C^T upper) */
        for (int i = d - 1; i >= 0; i--) {
            double *ci = cbar + IDX(i, 0);
            for (int j = 0; j < d; j++) ci[j] = y[IDX(i, j)];
            for (int k = i + 1; k < d; k++) {
                const double lki = chol[IDX(k, i)], *ck = cbar + IDX(k, 0);
                for (int j = 0; j < d; j++) ci[j] -= lki * ck[j];
            }
            const double inv = 1.0 / chol[IDX(i, i)];
            for (int j = 0; j < d; j++) ci[j] *= inv;
        }
        for (int i = 0; i < d; i++)
            for (int j = 0; j < d; j++) grad_factor_out[mb + IDX(i, j)] = j <= i ? -2.0 * t * cbar[IDX(i, j)] : 0.0;
    }
}

/* -- diagonal covariances ------------------------------------------------------------- */

static inline double load_value(const void *p, int64_t i, int f32) {
    return f32 ? (double)((const float *)p)[i] : ((const double *)p)[i];
}

static inline void store_value(void *p, int64_t i, double v, int f32) {
    if (f32) ((float *)p)[i] = (float)v;
    else ((double *)p)[i] = v;
}

/* r = v_o / v - 1 of one row (float64), and whether it is finite in the storage dtype
 * (float32: computed as the float32 torch path computes it) */
static int diag_ratios(const void *std, const void *old_std, int64_t vb, int d, int f32, double *sd, double *sd_o,
                       double *r) {
    int finite = 1;
    for (int i = 0; i < d; i++) {
        sd[i] = load_value(std, vb + i, f32);
        sd_o[i] = load_value(old_std, vb + i, f32);
        r[i] = ((sd_o[i] - sd[i]) / sd[i]) * ((sd_o[i] + sd[i]) / sd[i]);
        if (f32) {
            const float a = (float)sd[i], b = (float)sd_o[i];
            finite &= ((b - a) / a) * ((b + a) / a) < INFINITY;
        } else {
            finite &= r[i] < INFINITY;
        }
    }
    return finite;
}

/* the mean part: delta = mu - mu_o, L_o delta = delta / v_o, maha = <delta, L_o delta> */
static double diag_mean_parts(const void *mean, const void *old_mean, const double *sd_o, int64_t vb, int d,
                              int f32, double *mu, double *mu_o, double *delta, double *prec_delta) {
    double maha = 0.0;
    for (int i = 0; i < d; i++) {
        mu[i] = load_value(mean, vb + i, f32);
        mu_o[i] = load_value(old_mean, vb + i, f32);
        delta[i] = mu[i] - mu_o[i];
        prec_delta[i] = delta[i] / (sd_o[i] * sd_o[i]);
        maha += delta[i] * prec_delta[i];
    }
    return maha;
}

static void diag_forward_rows(int64_t begin, int64_t end, int d, int f32, const void *mean, const void *std,
                              const void *old_mean, const void *old_std, const double *mean_bound,
                              int64_t mean_bound_stride, const double *cov_bound, int64_t cov_bound_stride,
                              const kl_params *p, void *mean_out, void *std_out, void *t_out, uint8_t *conv_out) {
    double sd[MAXD], sd_o[MAXD], r[MAXD], mu[MAXD], mu_o[MAXD], delta[MAXD], prec_delta[MAXD];
    for (int64_t row = begin; row < end; row++) {
        const int64_t vb = row * d;
        const int finite = diag_ratios(std, old_std, vb, d, f32, sd, sd_o, r);
        const double maha = diag_mean_parts(mean, old_mean, sd_o, vb, d, f32, mu, mu_o, delta, prec_delta);
        const double eps_mu = 2.0 * mean_bound[row * mean_bound_stride];
        const int mean_active = maha > eps_mu;
        const double scale = sqrt(eps_mu / (mean_active ? maha : eps_mu));
        for (int i = 0; i < d; i++) store_value(mean_out, vb + i, mean_active ? mu_o[i] + scale * delta[i] : mu[i], f32);
        double t;
        int active;
        int conv = kl_dual_newton(r, d, cov_bound[row * cov_bound_stride], p, &t, &active);
        if (!finite) { /* the ratio overflowed the storage dtype: infinitely far there, so
                        * projected -- to the old std, reported -- as the torch solve does */
            active = 1;
            t = 0.0;
            conv = 0;
        }
        for (int i = 0; i < d; i++) {
            const double x = t * (r[i] < INFINITY ? r[i] : 0.0);
            store_value(std_out, vb + i, active ? sd_o[i] / sqrt(1.0 + x) : sd[i], f32);
        }
        store_value(t_out, row, t, f32);
        conv_out[row] = (uint8_t)conv;
    }
}

static void diag_backward_rows(int64_t begin, int64_t end, int d, int f32, const void *grad_mean,
                               const void *grad_std, const void *mean, const void *std, const void *old_mean,
                               const void *old_std, const void *t_in, const double *mean_bound,
                               int64_t mean_bound_stride, const double *cov_bound, int64_t cov_bound_stride,
                               const kl_params *p, void *grad_mean_out, void *grad_std_out) {
    double sd[MAXD], sd_o[MAXD], r[MAXD], mu[MAXD], mu_o[MAXD], delta[MAXD], prec_delta[MAXD];
    for (int64_t row = begin; row < end; row++) {
        const int64_t vb = row * d;
        const int finite = diag_ratios(std, old_std, vb, d, f32, sd, sd_o, r);
        /* the mean part: b g - (b / maha) <g, delta> L_o delta on projected rows */
        const double maha = diag_mean_parts(mean, old_mean, sd_o, vb, d, f32, mu, mu_o, delta, prec_delta);
        const double eps_mu = 2.0 * mean_bound[row * mean_bound_stride];
        const int mean_active = maha > eps_mu;
        const double m_safe = mean_active ? maha : eps_mu, scale = sqrt(eps_mu / m_safe);
        double g_dot = 0.0;
        for (int i = 0; i < d; i++) g_dot += load_value(grad_mean, vb + i, f32) * delta[i];
        for (int i = 0; i < d; i++) {
            const double g = load_value(grad_mean, vb + i, f32);
            store_value(grad_mean_out, vb + i, mean_active ? scale * g - (scale * g_dot / m_safe) * prec_delta[i] : g,
                        f32);
        }
        /* the covariance part (ops/kl.py kl_diag_backward): with x = t r, g = 1 + x,
         * dL/dsd = (t + x) (sd_o / sd) / g^3/2 [G + c x / (sd_o sqrt(g))],
         * c = -sum(sd_o / sqrt(g) G x / g) / sum((x / g)^2) */
        const int active = !finite || kl_at_one(r, d, p) > cov_bound[row * cov_bound_stride];
        const double t = load_value(t_in, row, f32);
        double num = 0.0, s2 = 0.0;
        for (int i = 0; i < d; i++) {
            const double x = t * (r[i] < INFINITY ? r[i] : 0.0), g = 1.0 + x, xg = x / g;
            num += (sd_o[i] / sqrt(g)) * load_value(grad_std, vb + i, f32) * xg;
            s2 += xg * xg;
        }
        const double c = -num / (s2 > 0.0 ? s2 : 1.0);
        for (int i = 0; i < d; i++) {
            const double gs = load_value(grad_std, vb + i, f32);
            const double x = t * (r[i] < INFINITY ? r[i] : 0.0), g = 1.0 + x, root_g = sqrt(g);
            const double g_sd = (t + x) * (sd_o[i] / sd[i]) / (g * root_g) * (gs + c * x / (sd_o[i] * root_g));
            store_value(grad_std_out, vb + i, active ? g_sd : gs, f32);
        }
    }
}

/* Diagonal forward / backward over rows [0, rows) on `threads` OpenMP threads (as the full
 * ones below); returns -1 for d outside [1, MAXD] */
int kl_diag_cpu_forward(int64_t rows, int threads, int d, int f32, const void *mean, const void *std,
                        const void *old_mean, const void *old_std, const double *mean_bound,
                        int64_t mean_bound_stride, const double *cov_bound, int64_t cov_bound_stride, int max_iter,
                        double tol, double phi_cut, int n_series, const double *phi_series, void *mean_out,
                        void *std_out, void *t_out, uint8_t *conv_out) {
    if (d < 1 || d > MAXD) return -1;
    if (threads < 1) threads = 1;
    const kl_params p = {max_iter, tol, phi_cut, n_series, phi_series, 0};
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int c = 0; c < threads; c++)
        diag_forward_rows(rows * c / threads, rows * (c + 1) / threads, d, f32, mean, std, old_mean, old_std,
                          mean_bound, mean_bound_stride, cov_bound, cov_bound_stride, &p, mean_out, std_out, t_out,
                          conv_out);
    return 0;
}

int kl_diag_cpu_backward(int64_t rows, int threads, int d, int f32, const void *grad_mean, const void *grad_std,
                         const void *mean, const void *std, const void *old_mean, const void *old_std,
                         const void *t_in, const double *mean_bound, int64_t mean_bound_stride,
                         const double *cov_bound, int64_t cov_bound_stride, double phi_cut, int n_series,
                         const double *phi_series, void *grad_mean_out, void *grad_std_out) {
    if (d < 1 || d > MAXD) return -1;
    if (threads < 1) threads = 1;
    const kl_params p = {0, 0.0, phi_cut, n_series, phi_series, 0};
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int c = 0; c < threads; c++)
        diag_backward_rows(rows * c / threads, rows * (c + 1) / threads, d, f32, grad_mean, grad_std, mean, std,
                           old_mean, old_std, t_in, mean_bound, mean_bound_stride, cov_bound, cov_bound_stride, &p,
                           grad_mean_out, grad_std_out);
    return 0;
}

/* rows [0, rows) on `threads` OpenMP threads (torch's own runtime: the library binds to the
 * libgomp.so.1 torch loaded, so its spinning workers pick this region up instead of
 * competing with a second pool for the cores); returns -1 for d outside [1, MAXD] */
int kl_full_cpu_forward(int64_t rows, int threads, int d, const double *mean, const double *factor,
                        const double *old_mean, const double *old_factor, const int64_t *matrix_strides,
                        const double *mean_bound, int64_t mean_bound_stride, const double *cov_bound,
                        int64_t cov_bound_stride, int max_iter, double tol, double phi_cut, int n_series,
                        const double *phi_series, int qr_max_steps, double *mean_out, double *chol_out,
                        double *t_out, uint8_t *conv_out, double *eigvals_out, double *u_inv_out) {
    if (d < 1 || d > MAXD) return -1;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int c = 0; c < threads; c++) forward_rows(rows * c / threads, rows * (c + 1) / threads, d, mean,
        factor, old_mean, old_factor, matrix_strides, mean_bound, mean_bound_stride, cov_bound,
        cov_bound_stride, max_iter, tol, phi_cut, n_series, phi_series, qr_max_steps, mean_out, chol_out,
        t_out, conv_out, eigvals_out, u_inv_out);
    return 0;
}

/* rows [0, rows) on `threads` OpenMP threads (torch's own runtime: the library binds to the
 * libgomp.so.1 torch loaded, so its spinning workers pick this region up instead of
 * competing with a second pool for the cores); returns -1 for d outside [1, MAXD] */
int kl_full_cpu_backward(int64_t rows, int threads, int d, const double *grad_mean,
                         const double *grad_factor, const double *mean, const double *factor,
                         const double *old_mean, const double *old_factor, const int64_t *matrix_strides,
                         const double *t_in, const double *eigvals, const double *u_inv_in,
                         const double *mean_bound, int64_t mean_bound_stride, const double *cov_bound,
                         int64_t cov_bound_stride, double phi_cut, int n_series, const double *phi_series,
                         double *grad_mean_out, double *grad_factor_out) {
    if (d < 1 || d > MAXD) return -1;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int c = 0; c < threads; c++) backward_rows(rows * c / threads, rows * (c + 1) / threads, d,
        grad_mean, grad_factor, mean, factor, old_mean, old_factor, matrix_strides, t_in, eigvals, u_inv_in,
        mean_bound, mean_bound_stride, cov_bound, cov_bound_stride, phi_cut, n_series, phi_series,
        grad_mean_out, grad_factor_out);
    return 0;
}
