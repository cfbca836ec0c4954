"""The arithmetic of low-rank layers: which rank-``r`` weight keeps a layer's output on real inputs.

A layer ``y = W x + b`` (a linear, or a 1x1 conv per pixel) becomes ``y = A (B x) + b'`` with ``B``
``r x in`` and ``A`` ``out x r``. Truncating ``W``'s own singular values (:func:`weight_svd`, what
users try first) minimises ``||W - AB||``, which says nothing about the inputs the layer sees.
:func:`project` minimises the error of the *output* on calibration inputs, ``E||W x - A B x||^2``:
with ``C`` the inputs' covariance, the best ``AB`` is ``U U^T W`` where ``U`` holds the top ``r``
eigenvectors of the output covariance ``W C W^T``. This is the same truncation as SVD of ``W``
whitened by the Cholesky factor ``L`` of ``C`` (SVD-LLM: ``[W L]_r L^-1``), written without the
inverse, so a rank-deficient ``C`` needs no care beyond a small damping. The inputs are centred
and the bias absorbs their mean, ``b' = b + (I - U U^T) W E[x]``, so the mean costs no rank.

Where some output features matter more to the model than others (a feature GELU mostly zeroes, or
one the next layer barely reads), the error is weighted per output feature by an importance ``D``
(Fisher-weighted SVD, Hsu et al. 2022): the same projection of ``D^1/2 W``, then ``A`` scaled back.

Given a least-squares re-fit ``W`` of the layer on the *factorised* model's inputs (the sequential
variant, :mod:`passes.low_rank.low_rank`), the same projection of the re-fitted weight is the
reduced-rank regression solution: the best rank-``r`` layer from the inputs it will see to the
outputs it should give.

A k x k convolution becomes 1x1 (``r_in``) -> k x k core -> 1x1 (``r_out``), Tucker-2. The input
factor keeps the input channels that matter to the output: with ``L`` the Cholesky factor of the
input channels' covariance, the top ``r_in`` eigenvectors ``Q`` of ``sum_t L^T W_t^T W_t L`` over
kernel taps ``t`` give ``B_in = Q^T L^-1`` and ``A_in = L Q`` (each tap's error ``W_t (I - A_in
B_in) L`` is then least). The core and output factor are the projection above applied to the
convolution from the ``r_in`` channels.
"""

from __future__ import annotations

import torch

_DAMPING = 1e-6  # of the mean diagonal, added to covariances so that full rank stays exact


def moments(rows: torch.Tensor, centred: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, covariance)`` of ``rows`` (n x k) in float64; uncentred (mean 0) when ``centred`` is False."""
    rows = rows.double()
    mean = rows.mean(dim=0) if centred else rows.new_zeros(rows.shape[1])
    shifted = rows - mean
    return mean, shifted.T @ shifted / max(1, rows.shape[0])


def damped(covariance: torch.Tensor) -> torch.Tensor:
    """``covariance`` plus a small multiple of the identity (positive definite, so every rank is reachable)."""
    scale = float(covariance.diagonal().mean().clamp(min=1e-12))
    return covariance + _DAMPING * scale * torch.eye(covariance.shape[0], dtype=covariance.dtype)


def output_spectrum(weight: torch.Tensor, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of the output covariance ``W C W^T``."""
    weight = weight.double()
    values, vectors = torch.linalg.eigh(weight @ damped(covariance) @ weight.T)
    order = values.argsort(descending=True)
    return values[order].clamp(min=0), vectors[:, order]


def tail_energy(values: torch.Tensor) -> torch.Tensor:
    """``tail[r]``: the output energy a rank-``r`` truncation loses, for ``r`` = 0 .. len(values)."""
    suffix = values.flip(0).cumsum(0).flip(0)
    return torch.cat([suffix, suffix.new_zeros(1)])


def project(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, covariance: torch.Tensor,
            rank: int, importance: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(B, A, b')``: the rank-``rank`` layer nearest ``W x + b`` in output, on inputs of this mean and covariance.

    With ``importance`` (one positive weight per output feature, ``D``), the output error is
    weighted: ``E||D^1/2 (W x - A B x)||^2``, so ``A B = D^-1/2 U U^T D^1/2 W``.
    """
    weight = weight.double()
    root = importance.double().sqrt() if importance is not None else weight.new_ones(weight.shape[0])
    basis = output_spectrum(root[:, None] * weight, covariance)[1][:, :rank]
    first, last = basis.T @ (root[:, None] * weight), basis / root[:, None]
    if bias is None:
        return first, last, None
    residual = weight @ mean - last @ (first @ mean)
    return first, last, bias.double() + residual


def weight_svd(weight: torch.Tensor, bias: torch.Tensor | None,
               rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(B, A, b)``: plain truncated SVD of the weight, ``A = U_r S_r``, ``B = V_r^T`` (the data-blind baseline).

    A rank above the weight's smaller side is padded with zero components (the chain stays exact).
    """
    left, values, right = torch.linalg.svd(weight.double(), full_matrices=False)
    first, last = right[:rank], left[:, :rank] * values[:rank]
    missing = rank - first.shape[0]
    if missing > 0:
        first = torch.cat([first, first.new_zeros(missing, first.shape[1])])
        last = torch.cat([last, last.new_zeros(last.shape[0], missing)], dim=1)
    return first, last, None if bias is None else bias.double()


def weight_spectrum(weight: torch.Tensor) -> torch.Tensor:
    """Squared singular values of the weight, descending (the energy plain SVD keeps)."""
    return torch.linalg.svdvals(weight.double()).square()


def input_factor(taps: torch.Tensor, covariance: torch.Tensor | None,
                 rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B_in, A_in, eigenvalues)`` of a conv weight ``(out, in, kh, kw)`` kept to ``rank`` input channels.

    With ``covariance`` (of the input channels) the factor is whitened by its Cholesky factor, so the
    channels the data uses are kept; with None it is the weight's own (HOSVD's mode-1 factor).
    """
    taps = taps.double()
    per_tap = taps.permute(2, 3, 0, 1).reshape(-1, taps.shape[0], taps.shape[1])  # (kh*kw, out, in)
    gram = torch.einsum("toi,toj->ij", per_tap, per_tap)
    if covariance is None:
        values, vectors = torch.linalg.eigh(gram)
        order = values.argsort(descending=True)
        basis = vectors[:, order[:rank]]
        return basis.T, basis, values[order].clamp(min=0)
    lower = torch.linalg.cholesky(damped(covariance))
    values, vectors = torch.linalg.eigh(lower.T @ gram @ lower)
    order = values.argsort(descending=True)
    basis = vectors[:, order[:rank]]
    first = torch.linalg.solve_triangular(lower.T, basis, upper=True).T  # Q^T L^-1 = (L^-T Q)^T
    return first, lower @ basis, values[order].clamp(min=0)


def compose(first: torch.Tensor, last: torch.Tensor, core: torch.Tensor | None = None) -> torch.Tensor:
    """The single weight equal to the chain: ``A B`` as a matrix, or Tucker-2's ``(out, in, kh, kw)`` kernel.

    ``first`` is ``B`` (``r x in``, or ``r_in x in`` before a core), ``core`` ``(r_out, r_in, kh, kw)``
    and ``last`` ``A`` (``out x r`` or ``out x r_out``).
    """
    if core is None:
        return last @ first
    return torch.einsum("or,rskl,si->oikl", last, core, first)
