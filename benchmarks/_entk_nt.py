"""neural-tangents side of ``benchmarks/entk.py``: run with ``.venv-nt/bin/python`` (JAX, no torch).

    .venv-nt/bin/python benchmarks/_entk_nt.py --worker '{"npz": ..., "impl": ..., ...}'

The models are plain JAX functions that mirror the torch modules of ``benchmarks/entk.py`` and
take the torch weights from the ``.npz`` the parent wrote (dense weights stored transposed,
``(in, out)``, so that ``f`` computes ``x W + b``: neural-tangents' structured rules do not see
through a transpose of a parameter, which would silently turn STRUCTURED_DERIVATIVES into a
Jacobian contraction; convolutions NCHW/OIHW as in torch), so the kernels can be compared entry
by entry. The ResNet (issue 16) is written in neural-tangents' best layouts: NHWC activations
and HWIO kernels (the parent stores them so), eval-mode BatchNorm as a per-channel affine map
with the running statistics as constants and ``γ``, ``β`` as parameters. neural-tangents
is imported without its TensorFlow bridge (``neural_tangents/__init__`` pulls in ``jax2tf``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import types

from _common import time_calls, worker_reply


def _import_empirical():
    spec = importlib.util.find_spec("neural_tangents")
    if spec is None:
        raise ImportError("neural_tangents is not installed in this interpreter")
    pkg = types.ModuleType("neural_tangents")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("neural_tangents", pkg)
    from neural_tangents._src import empirical

    return empirical


def _model(kind: str):
    import jax
    import jax.numpy as jnp

    if kind == "mlp":
        def f(params, x):
            h = x
            for i, (w, b) in enumerate(params):
                h = h @ w + b
                if i < len(params) - 1:
                    h = jnp.tanh(h)
            return h
        return f

    def conv(x, w, b, stride):
        y = jax.lax.conv_general_dilated(x, w, (stride, stride), [(1, 1), (1, 1)],
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return y + b[None, :, None, None]

    def g(params, x):
        (w1, b1), (w2, b2), (w3, b3) = params
        h = jax.nn.relu(conv(x, w1, b1, 1))
        h = jax.nn.relu(conv(h, w2, b2, 2))
        return h.reshape(h.shape[0], -1) @ w3 + b3
    return g


def _resnet(data):
    """``(f, params)`` for the ResNet of ``benchmarks/entk.py`` from the torch state dict in
    ``data`` (NHWC/HWIO; BatchNorm statistics closed over as constants)."""
    import jax
    import jax.numpy as jnp

    names = [k for k in data.files if k != "x" and not k.endswith(("running_mean",
                                                                     "running_var", "stride"))]
    params = {k: jnp.asarray(data[k]) for k in names}
    stats = {k: jnp.asarray(data[k]) for k in data.files if k.endswith(("running_mean",
                                                                        "running_var"))}
    n_blocks = sum(1 for k in names if k.endswith(".conv1.weight"))
    strides = [int(data[f"blocks.{i}.stride"]) for i in range(n_blocks)]

    def conv(x, w, stride):
        pad = (w.shape[0] - 1) // 2
        return jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad), (pad, pad)],
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def bn(prm, x, name):
        inv = 1.0 / jnp.sqrt(stats[f"{name}.running_var"] + 1e-5)
        return (x - stats[f"{name}.running_mean"]) * (prm[f"{name}.weight"] * inv) \
            + prm[f"{name}.bias"]

    def f(prm, x):
        h = jax.nn.relu(bn(prm, conv(x, prm["stem.weight"], 1), "bn"))
        for i, s in enumerate(strides):
            b = f"blocks.{i}"
            y = jax.nn.relu(bn(prm, conv(h, prm[f"{b}.conv1.weight"], s), f"{b}.bn1"))
            y = bn(prm, conv(y, prm[f"{b}.conv2.weight"], 1), f"{b}.bn2")
            if f"{b}.proj.0.weight" in prm:
                h = bn(prm, conv(h, prm[f"{b}.proj.0.weight"], s), f"{b}.proj.1")
            h = jax.nn.relu(y + h)
        return h.mean((1, 2)) @ prm["head.weight"] + prm["head.bias"]

    return f, params


def main(payload: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    emp = _import_empirical()
    data = np.load(payload["npz"])
    if payload["model"] == "resnet":
        f, params = _resnet(data)
    else:
        n_layers = sum(1 for k in data.files if k.startswith("w"))
        params = [(jnp.asarray(data[f"w{i}"]), jnp.asarray(data[f"b{i}"]))
                  for i in range(n_layers)]
        f = _model(payload["model"])
    x = jnp.asarray(data["x"])
    impl = emp.NtkImplementation[payload["impl"].upper()]
    fn = jax.jit(emp.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=impl))
    t0 = time.perf_counter()
    compiled = fn.lower(x, None, params).compile()
    compile_s = time.perf_counter() - t0
    result = time_calls(lambda: compiled(x, None, params).block_until_ready(),
                        repeats=0 if payload.get("memory_only") else payload.get("repeats", 3))
    if payload.get("memory_only"):
        return result
    result["compile_seconds"] = compile_s
    dev = jax.devices()[0]
    result["device"] = f"{dev.platform}:{getattr(dev, 'device_kind', '')}"
    if dev.platform == "gpu":                        # the accelerator's own peak, not RSS
        result["gpu_peak_bytes"] = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    if payload.get("save_kernel"):
        np.save(payload["save_kernel"], np.asarray(compiled(x, None, params)))
    from importlib.metadata import version

    import neural_tangents  # noqa: F401  (the stub package: version from metadata)

    result["versions"] = {"jax": jax.__version__, "neural_tangents": version("neural-tangents")}
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_reply(main(json.loads(sys.argv[2])))
    else:
        sys.exit(__doc__)
