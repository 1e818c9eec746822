"""The pieces of the reservoir-pruning experiment: one recorded run, the channel scores, the
saliencies and the sparsity sweep (with and without fine-tuning)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..dynamics import KernelRecorder, logspaced
from ..dynamics.channel_score import frozen_kernel_channel_scores
from ..dynamics.channels import split_channels
from ..dynamics.label_noise import classification_error
from ..dynamics.matfree_path import capture_state
from ..dynamics.operators import window_operators
from ..dynamics.pruning import (
    apply_masks,
    compact_mlp,
    global_masks,
    keep_masked,
    magnitude_saliency,
    neuron_masks,
    neuron_saliency,
    obd_saliency,
    random_saliency,
    snip_saliency,
    sparsity_of,
    weight_names,
)

SALIENCIES = ("channel", "channel_obd", "dissipation", "magnitude", "snip", "obd", "random")
THEORY = ("channel", "channel_obd", "dissipation")


@dataclasses.dataclass
class RecordedRun:
    """A trained network, its recorded trajectory's channel and the per-parameter scores.

    Attributes:
        net: the trained network; final: its parameters (a copy).
        lr: the GD step; x, Y, labels: training inputs, one-hot targets, labels.
        saliencies: name → ``{param: score}`` (:data:`SALIENCIES`).
        info: scalars of the run (channel rank, score checks, accuracies).
        arrays: W_S eigenvalues and flat scores, for the figures.
    """

    net: nn.Sequential
    final: dict[str, Tensor]
    lr: float
    x: Tensor
    Y: Tensor
    labels: Tensor
    saliencies: dict[str, dict[str, Tensor]]
    info: dict[str, Any]
    arrays: dict[str, np.ndarray]


def accuracy(net: nn.Module, x: Tensor, labels: Tensor) -> float:
    """``1 −`` classification error of ``net`` on ``(x, labels)``."""
    with torch.no_grad():
        return 1.0 - classification_error(net(x), labels)


def gd_train(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, Y: Tensor, steps: int
             ) -> float:
    """``steps`` full-batch steps on ``Φ = ‖f(x) − Y‖²/(2n)``; returns the final ``Φ``."""
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (0.5 * (net(x) - Y).pow(2).sum(1).mean()).backward()
        opt.step()
    with torch.no_grad():
        return float(0.5 * (net(x) - Y).pow(2).sum(1).mean())


def channel_probes(V: Tensor, probes: int, seed: int) -> Tensor:
    """``V`` itself (``probes = 0`` or ``≥`` its columns), else ``V Q √(r/c)`` with ``Q``
    ``(r, c)`` random orthonormal columns: ``E[Vp Vpᵀ] = V Vᵀ`` (a Hutchinson estimate of the
    projector, with the lower variance of orthogonal probes)."""
    r = V.shape[1]
    if probes <= 0 or probes >= r:
        return V
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(r, probes, generator=g, dtype=torch.float64))
    return V @ Q * math.sqrt(r / probes)


def record_and_score(net: nn.Sequential, x: Tensor, Y: Tensor, labels: Tensor, lr: float, *,
                     steps: int, snapshots: int, threshold: float, probes: int, ratio: float,
                     seed: int) -> RecordedRun:
    """Train ``net`` by GD with a :class:`KernelRecorder`, form ``W_S(0, T)`` from the recorded
    kernels (``exp`` operators), split the channel at ``threshold`` of the saturation value
    ``n/2``, and score every parameter (:func:`frozen_kernel_channel_scores`, the kernel frozen
    on each interval as the operators assume)."""
    n = x.shape[0]
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    states: list[dict[str, Any]] = []
    rec = KernelRecorder(net, x, Y, optimizer=opt, schedule=logspaced(steps, snapshots),
                         total_steps=steps, verbose=False,
                         on_snapshot=lambda i, s: states.append(capture_state(net)))
    final_loss = gd_train(net, opt, x, Y, steps)
    rec.close()
    traj = rec.trajectory()
    W = window_operators(traj, discretization="exp").W
    b = traj.hessian_scale() or 1.0 / n
    split = split_channels(W, threshold=threshold / (2 * b), mode="absolute")
    Vp = channel_probes(split.eigenvectors[:, :split.rank], probes, seed)
    g0 = traj.g[0].reshape(-1, 1).to(torch.float64)
    ch = frozen_kernel_channel_scores(net, traj, states, x, Vp, ratio=ratio)
    dis = frozen_kernel_channel_scores(net, traj, states, x, g0, ratio=ratio)
    final = {k: v.detach().clone() for k, v in net.named_parameters()}
    lam = split.eigenvalues
    want_ch = float(lam[:split.rank].sum())
    want_probe = float(torch.trace(Vp.T @ W @ Vp))
    want_dis = float(g0.reshape(-1) @ W @ g0.reshape(-1))
    sal: dict[str, dict[str, Tensor]] = {
        "channel": dict(ch.scores), "dissipation": dict(dis.scores),
        "channel_obd": {k: final[k].to(torch.float64).pow(2) * v for k, v in ch.scores.items()},
        "magnitude": magnitude_saliency(net), "snip": snip_saliency(net, x, Y),
        "obd": obd_saliency(net, x), "random": random_saliency(net, seed)}
    flat = {k: torch.cat([s[w].reshape(-1) for w in weight_names(net)]).numpy()
            for k, s in sal.items()}
    info = {"N": traj.N, "snapshots": len(traj), "channel_rank": split.rank,
            "channel_fraction_of_N": split.rank / traj.N, "probes": int(Vp.shape[1]),
            "cut": split.cut, "gap": split.gap,
            "loss_dissipated": float(traj.loss[0] - traj.loss[-1]),
            "dissipation_pred": want_dis,
            "channel_score_quadrature_rel_error": abs(ch.total - want_probe) / max(want_probe,
                                                                                   1e-300),
            "channel_score_trace_rel_error": abs(ch.total - want_ch) / max(want_ch, 1e-300),
            "dissipation_score_total_rel_error": abs(dis.total - want_dis) / max(want_dis, 1e-300),
            "final_train_loss": final_loss,
            "zero_channel_score_fraction": float((flat["channel"] <= 1e-12 * flat["channel"].max()
                                                  ).mean()),
            **{f"rank_corr_channel_{k}": _spearman(flat["channel"], flat[k])
               for k in SALIENCIES if k != "channel"}}
    arrays = {"W_eigenvalues": lam.numpy(), **{f"score_{k}": v for k, v in flat.items()}}
    return RecordedRun(net, final, lr, x, Y, labels, sal, info, arrays)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    c = np.corrcoef(ra, rb)[0, 1]
    return float(c) if math.isfinite(c) else float("nan")


def masks_for(run: RecordedRun, saliency: str, structure: str, level: float
              ) -> dict[str, Tensor]:
    """Unstructured: the global mask at sparsity ``level``; neurons: remove the ``level``
    fraction of units of every hidden layer."""
    sal = run.saliencies[saliency]
    if structure == "unstructured":
        return global_masks(sal, level, names=weight_names(run.net))
    return neuron_masks(run.net, neuron_saliency(run.net, sal), level)


def sweep(run: RecordedRun, x_test: Tensor, labels_test: Tensor, *,
          saliencies: Sequence[str], sparsities: Sequence[float],
          neuron_fractions: Sequence[float], finetune_steps: int) -> list[dict[str, Any]]:
    """Test accuracy of every ``saliency × structure × level``, before and after
    ``finetune_steps`` GD steps with the masks kept; plus the dense reference rows."""
    net, names = run.net, weight_names(run.net)
    total = sum(p.numel() for p in net.parameters())

    def reset() -> None:
        with torch.no_grad():
            for k, v in net.named_parameters():
                v.copy_(run.final[k])

    rows: list[dict[str, Any]] = []
    reset()
    dense = {"saliency": "dense", "structure": "none", "level": 0.0, "sparsity": 0.0,
             "params_kept": total}
    rows.append({**dense, "finetuned": False, "test_acc": accuracy(net, x_test, labels_test),
                 "train_acc": accuracy(net, run.x, run.labels)})
    gd_train(net, torch.optim.SGD(net.parameters(), lr=run.lr), run.x, run.Y, finetune_steps)
    rows.append({**dense, "finetuned": True, "test_acc": accuracy(net, x_test, labels_test),
                 "train_acc": accuracy(net, run.x, run.labels)})
    grid = [("unstructured", float(s)) for s in sparsities] + [
        ("neurons", float(f)) for f in neuron_fractions]
    for sal in saliencies:
        for structure, level in grid:
            reset()
            m = masks_for(run, sal, structure, level)
            apply_masks(net, m)
            kept = total - sum(int((~v).sum()) for v in m.values())
            if structure == "neurons":
                kept = sum(p.numel() for p in compact_mlp(net, m).parameters())
            base = {"saliency": sal, "structure": structure, "level": level,
                    "sparsity": sparsity_of(m, names), "params_kept": kept}
            rows.append({**base, "finetuned": False,
                         "test_acc": accuracy(net, x_test, labels_test),
                         "train_acc": accuracy(net, run.x, run.labels)})
            if finetune_steps > 0:
                opt = torch.optim.SGD(net.parameters(), lr=run.lr)
                handle = keep_masked(opt, net, m)
                gd_train(net, opt, run.x, run.Y, finetune_steps)
                handle.remove()
                rows.append({**base, "finetuned": True,
                             "test_acc": accuracy(net, x_test, labels_test),
                             "train_acc": accuracy(net, run.x, run.labels)})
    reset()
    return rows


def curve_key(r: Mapping[str, Any]) -> str:
    """``structure/saliency/ft|noft``: one accuracy-vs-sparsity curve."""
    return f"{r['structure']}/{r['saliency']}/{'ft' if r['finetuned'] else 'noft'}"
