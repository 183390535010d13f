"""Hadamard transforms shared by the formats and quantizers that rotate (``trellis``: random Hadamard
(RHT) incoherence; ``w4a4``: SpinQuant's fixed R3/R4 and QuaRot-style random R1/R2).

The Hadamard matrix of size n is ``R_n = (H_K (x) H_p) / sqrt(n)``, where p = n / K is a power of two,
``H_p`` is the Sylvester (Walsh, natural order) matrix and ``H_K`` a Hadamard matrix of a small order K.
K is the first entry of :data:`K_ORDER` that divides n with n / K a power of two (K = 1 when n is a
power of two), as in QTIP; any other n has no construction here and is refused with a ValueError
naming the size. Every Llama-family size qualifies: 576 = 36*16, 1536 = 12*128, 4096, 5120 = 20*256,
11008 = 172*64, 12288 = 12*1024, 13824 = 108*128, 14336 = 28*512, 22016 = 172*128, 28672 = 28*1024.

Row vectors: ``x -> x R_n`` views the last axis as (K, p) (index = a*p + b), runs an unnormalised fast
Walsh-Hadamard transform over p (O(n log n)), mixes the K axis with ``H_K^T`` (a K x K product,
K <= 172) and scales by n^-1/2. ``x -> x R_n^T`` mixes with ``H_K`` instead (H_12, H_20 and H_108
are not symmetric, so the difference matters).

``H_K``: transposed Paley-I for K - 1 prime = 3 (mod 4) (12, 20, 60, 108, 140), Paley-II for
K/2 - 1 prime = 1 (mod 4) (28, 36, 124), and stored tables for 52, 116, 156, 172
(:mod:`._hadamard_data`).

The weight of a linear y = x W^T is quantized in the rotated basis
``W~ = R_m^T S_V W S_U R_n`` (S = diag of random signs), so that ``tr(dW H dW^T)`` is unchanged with
``H~ = R_n^T S_U H S_U R_n``. ``out_blocks = b > 1`` uses a block-diagonal output transform, one
``R_{m/b}`` per block of m/b consecutive output rows (GuidedQuant's exact per-group variant).
"""
from __future__ import annotations

import functools

import torch

# QTIP's search order for the non-power-of-two factor.
K_ORDER = (172, 156, 140, 124, 116, 108, 60, 52, 36, 28, 20, 12)


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _paley1_transposed(K: int) -> list[list[int]]:
    """Order K with q = K - 1 prime, q = 3 mod 4: H[0][0] = 1, H[0][j>0] = -1, H[i>0][0] = 1,
    H[i][i] = 1, else chi(i - j) (chi: Legendre symbol mod q)."""
    q = K - 1
    H = [[0] * K for _ in range(K)]
    for i in range(K):
        for j in range(K):
            if i == 0:
                H[i][j] = 1 if j == 0 else -1
            elif j == 0 or i == j:
                H[i][j] = 1
            else:
                H[i][j] = _legendre(i - j, q)
    return H


def _paley2(K: int) -> list[list[int]]:
    """Order K with q = K/2 - 1 prime, q = 1 mod 4: [[C+I, C-I], [C-I, -C-I]] with C the Paley
    conference matrix of order K/2 (C00 = 0, first row and column 1, C_ij = chi(j - i))."""
    h = K // 2
    q = h - 1
    C = [[0] * h for _ in range(h)]
    for i in range(h):
        for j in range(h):
            if i == 0 and j == 0:
                C[i][j] = 0
            elif i == 0 or j == 0:
                C[i][j] = 1
            else:
                C[i][j] = _legendre(j - i, q)
    H = [[0] * K for _ in range(K)]
    for i in range(h):
        for j in range(h):
            e = 1 if i == j else 0
            H[i][j] = C[i][j] + e
            H[i][j + h] = C[i][j] - e
            H[i + h][j] = C[i][j] - e
            H[i + h][j + h] = -C[i][j] - e
    return H


def _stored(K: int) -> list[list[int]]:
    from gq_kernels._hadamard_data import PACKED

    hx = "".join(PACKED[K])
    bits = bin(int(hx, 16))[2:].zfill(len(hx) * 4)
    return [[1 if bits[i * K + j] == "1" else -1 for j in range(K)] for i in range(K)]


@functools.cache
def _hadamard_k_list(K: int) -> tuple[tuple[int, ...], ...]:
    if K == 1:
        H = [[1]]
    elif _is_prime(K - 1) and (K - 1) % 4 == 3:
        H = _paley1_transposed(K)
    elif K % 2 == 0 and _is_prime(K // 2 - 1) and (K // 2 - 1) % 4 == 1:
        H = _paley2(K)
    else:
        H = _stored(K)
    return tuple(tuple(r) for r in H)


def hadamard_k(K: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The K x K Hadamard matrix H_K (entries +-1, H H^T = K I) for K in (1, *K_ORDER)."""
    if K != 1 and K not in K_ORDER:
        raise ValueError(f"no Hadamard matrix of order {K} here; orders: {[1, *K_ORDER]}")
    return _hadamard_k_cached(K, dtype, str(device))


@functools.cache
def _hadamard_k_cached(K: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    # Never an inference tensor, even when first asked for under inference_mode: a cached one would
    # refuse to take part in autograd later (the w4a4 fine-tune after the clip pass).
    with torch.inference_mode(False):
        return torch.tensor(_hadamard_k_list(K), dtype=dtype, device=device)


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def hadamard_factor(n: int) -> tuple[int, int]:
    """(K, p) with n = K * p, p a power of two, K = 1 or the first of :data:`K_ORDER` that fits.

    Raises ValueError naming n when no construction exists."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard size must be a positive integer, got {n!r}")
    if _pow2(n):
        return 1, n
    for K in K_ORDER:
        if n % K == 0 and _pow2(n // K):
            return K, n // K
    raise ValueError(
        f"no Hadamard construction for size {n}: it must be 2^a or K*2^a with K in {list(K_ORDER)} "
        f"(e.g. 576 = 36*16, 11008 = 172*64)")


def has_hadamard(n: int) -> bool:
    try:
        hadamard_factor(n)
    except ValueError:
        return False
    return True


_SYLVESTER_BLOCK = 128  # H_p = H_a (x) H_b with a, b <= 128 for every p up to 2^14


@functools.cache
def _sylvester(p: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The unnormalised Sylvester matrix H_p (symmetric, natural order)."""
    with torch.inference_mode(False):  # as in _hadamard_k_cached
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < p:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h.to(dtype=dtype, device=device)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform (natural order) over the last axis (a power of 2):
    ``x @ H_p`` with H_p symmetric.

    Up to p = 2^14 as two dense products with the Kronecker factors (H_p = H_a (x) H_b, a, b <= 128:
    a + b multiply-adds per element in two GEMMs, which beats log2(p) passes of elementwise
    butterflies on CPUs and GPUs alike); beyond, the O(p log p) butterflies."""
    p = x.shape[-1]
    if not _pow2(p):
        raise ValueError(f"fwht needs a power-of-two length, got {p}")
    lead = x.shape[:-1]
    y = x.reshape(-1, p)
    if p <= _SYLVESTER_BLOCK * _SYLVESTER_BLOCK:
        b = min(p, _SYLVESTER_BLOCK)
        a = p // b
        dev = str(x.device)
        y = y.reshape(-1, a, b) @ _sylvester(b, x.dtype, dev)            # each row's b-blocks: x H_b
        if a > 1:
            y = torch.matmul(_sylvester(a, x.dtype, dev), y)                  # mix the blocks: H_a (.)
        return y.reshape(*lead, p)
    h = 1
    while h < p:
        y = y.view(-1, p // (2 * h), 2, h)
        a_, b_ = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a_ + b_, a_ - b_), dim=2)
        h *= 2
    return y.reshape(*lead, p)


def hadamard_transform(x: torch.Tensor, transpose: bool = False, blocks: int = 1) -> torch.Tensor:
    """``x @ R_n`` (``transpose``: ``x @ R_n^T``) over the last axis, n = x.shape[-1].

    ``blocks = b``: the last axis is b consecutive blocks of n/b, each transformed by R_{n/b}
    (a block-diagonal transform). Runs in x's dtype (float32 for exact comparisons)."""
    n = x.shape[-1]
    if blocks < 1 or n % blocks:
        raise ValueError(f"{blocks} Hadamard blocks do not divide size {n}")
    nb = n // blocks
    K, p = hadamard_factor(nb)
    lead = x.shape[:-1]
    y = x.reshape(*lead, blocks, K, p)
    y = fwht(y)
    if K > 1:
        HK = hadamard_k(K, y.dtype, y.device)
        # x R_n: out[a] = sum_b H_K[b, a] in[b]; x R_n^T: out[a] = sum_b H_K[a, b] in[b].
        y = torch.matmul(HK if transpose else HK.t(), y)
    return (y * (nb ** -0.5)).reshape(*lead, n)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense R_n (for tests and small sizes): row i is e_i R_n."""
    return hadamard_transform(torch.eye(n, dtype=dtype))


def random_signs(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """i.i.d. +-1 (float32) of length n."""
    device = generator.device if generator is not None else None
    return torch.randint(0, 2, (n,), generator=generator, device=device).float().mul_(2).sub_(1)


def rotate_weight(w: torch.Tensor, su: torch.Tensor, sv: torch.Tensor, out_blocks: int = 1) -> torch.Tensor:
    """``W~ = R_m^T S_V W S_U R_n`` for w [m, n] (float32 in, float32 out)."""
    a = hadamard_transform(w.float() * su.float()[None, :])           # W S_U R_n
    a = a * sv.float()[:, None]                                       # S_V ...
    return hadamard_transform(a.t().contiguous(), blocks=out_blocks).t().contiguous()  # R_m^T ...


def unrotate_weight(wt: torch.Tensor, su: torch.Tensor, sv: torch.Tensor, out_blocks: int = 1) -> torch.Tensor:
    """Inverse of :func:`rotate_weight`: ``W = S_V R_m W~ R_n^T S_U``."""
    a = hadamard_transform(wt.float(), transpose=True)                               # W~ R_n^T
    a = hadamard_transform(a.t().contiguous(), transpose=True, blocks=out_blocks).t()  # R_m ...
    return (a * sv.float()[:, None] * su.float()[None, :]).contiguous()


def rotate_hessian(H: torch.Tensor, su: torch.Tensor | None = None) -> torch.Tensor:
    """``H~ = R_n^T S_U H S_U R_n`` for H [n, n] or a stack [g, n, n] (symmetrised); without ``su``,
    ``R_n^T H R_n`` (the Hessian of the inputs ``x R_n``)."""
    s = 1.0 if su is None else su.to(H.dtype)
    a = hadamard_transform(H * s)                     # H S_U R_n (rows of H, last axis)
    a = hadamard_transform(a.transpose(-1, -2) * s)  # (S_U H S_U R_n)^T S_U R_n ... = (R_n^T S_U H S_U R_n)^T
    a = a.transpose(-1, -2)
    return (a + a.transpose(-1, -2)) * 0.5
