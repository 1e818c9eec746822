"""neural-tangents side of ``benchmarks/entk.py``: run with ``.venv-nt/bin/python`` (JAX, no torch).

    .venv-nt/bin/python benchmarks/_entk_nt.py --worker '{"npz": ..., "impl": ..., ...}'

The models are plain JAX functions that mirror the torch modules of ``benchmarks/entk.py`` and
take the torch weights from the ``.npz`` the parent wrote (dense weights stored transposed,
``(in, out)``, so that ``f`` computes ``x W + b``: neural-tangents' structured rules do not see
through a transpose of a parameter, which would silently turn STRUCTURED_DERIVATIVES into a
Jacobian contraction; convolutions NCHW/OIHW as in torch), so the kernels can be compared entry
by entry. neural-tangents
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


def main(payload: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    emp = _import_empirical()
    data = np.load(payload["npz"])
    n_layers = sum(1 for k in data.files if k.startswith("w"))
    params = [(jnp.asarray(data[f"w{i}"]), jnp.asarray(data[f"b{i}"])) for i in range(n_layers)]
    x = jnp.asarray(data["x"])
    impl = emp.NtkImplementation[payload["impl"].upper()]
    fn = jax.jit(emp.empirical_ntk_fn(_model(payload["model"]), trace_axes=(), vmap_axes=0,
                                      implementation=impl))
    t0 = time.perf_counter()
    compiled = fn.lower(x, None, params).compile()
    compile_s = time.perf_counter() - t0
    result = time_calls(lambda: compiled(x, None, params).block_until_ready(),
                        repeats=payload.get("repeats", 3))
    result["compile_seconds"] = compile_s
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
