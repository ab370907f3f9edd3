"""Ours against other implementations of the same network, timed interleaved in one process.

The peers are other implementations (timm, Keras, torchvision's Inception V3 for the paper's Table 3) and other
runtimes of the same network (ONNX Runtime, OpenVINO: a row per precision). They are optional: one that is not
installed, or cannot run in this configuration, comes back from :func:`compare` as a :class:`~.timing.Result` with
``skipped`` set to the reason.

Given a trained model and real images (:class:`RealImages`), :func:`compare` times that model, ours deployed and the
other runtimes of it on a real batch, calibrates int8 on real images, and reports beside each speed the share of
held-out images on which the candidate agrees with the eager fp32 model.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..models import create_model
from ..precision import autocast
from .selection import batched_outputs, calibration_batches, timed_batch
from .timing import (
    BenchmarkConfig,
    Candidate,
    Result,
    check_device,
    count_params_and_macs,
    intra_op_threads,
    module_candidate,
    run_interleaved,
    with_peak_fraction,
)

INCEPTION_SIZE = (299, 299)  # torchvision's Inception V3 is timed at its own input size, as in the paper's Table 3


class PeerUnavailable(Exception):
    """A peer that cannot run here; :func:`compare` reports it as skipped with this message."""


@dataclasses.dataclass
class RealImages:
    """A trained model and real images for :func:`compare`, preprocessed as for evaluation (NCHW): int8 calibrates
    on ``calibration`` (whose first batch is the timed batch), and each candidate's agreement with the model's eager
    fp32 outputs is measured on ``held_out`` (with its ``labels``) by ``agreement``, a
    :class:`~xception.deploy.TopOneAgreement` or :class:`~xception.deploy.MeanIoUAgreement`."""

    model: nn.Module
    calibration: torch.Tensor
    held_out: torch.Tensor
    labels: torch.Tensor
    agreement: Any


@dataclasses.dataclass
class Workload:
    """What the candidates of one :func:`compare` built from our model share: the model (as created, or trained),
    the timed batch and int8's calibration batches."""

    model: nn.Module
    x: torch.Tensor
    calibration: list[torch.Tensor]

    @classmethod
    def of(cls, config: BenchmarkConfig, real: RealImages | None) -> Workload:
        """Random images for ``config.model`` as created, or ``real``'s model and images."""
        if real is None:
            model = create_model(config.model, **config.model_options).eval()
            x = torch.randn(config.batch_size, getattr(model, "in_chans", 3), *config.img_size, device=config.device)
            # Random calibration images: the speed of an int8 model does not depend on its activation ranges.
            return cls(model, x, [torch.randn_like(x) for _ in range(4)])
        x = timed_batch(real.calibration, config.batch_size).to(config.device)
        calibration = [batch.to(config.device) for batch in calibration_batches(real.calibration, config.batch_size)]
        return cls(real.model.to(config.device).eval(), x, calibration)


def _timm_candidates(config: BenchmarkConfig, workload: Workload) -> list[Candidate]:
    """timm's port of the Cadene/Keras Xception, in both layouts: compare() keeps the faster."""
    try:
        import timm
    except ImportError as error:
        raise PeerUnavailable(f"timm is not installed ({error})") from error
    return [module_candidate("timm legacy_xception", timm.create_model("legacy_xception"), config,
                             channels_last=channels_last)
            for channels_last in (False, True)]


def _keras_candidates(config: BenchmarkConfig, workload: Workload) -> list[Candidate]:
    """keras.applications.Xception on the PyTorch backend, eager, NHWC input, ``model(x, training=False)``."""
    if config.mode != "inference":
        raise PeerUnavailable("the keras peer is timed in inference mode only")
    keras = _import_keras()
    height, width = config.img_size
    with keras.device(config.device):
        model = keras.applications.Xception(weights=None, input_shape=(height, width, 3))
    x = torch.randn(config.batch_size, height, width, 3, device=config.device)

    def step() -> object:
        with keras.device(config.device), torch.no_grad(), autocast(config.device, config.precision):
            return model(x, training=False)

    return [Candidate("keras Xception", "NHWC", step, (height, width), params=model.count_params())]


def _import_keras() -> Any:
    """Keras on the torch backend. The backend is fixed at keras's first import, hence the checks."""
    if sys.modules.get("keras") is None:
        backend = os.environ.setdefault("KERAS_BACKEND", "torch")
        if backend != "torch":
            raise PeerUnavailable(f"KERAS_BACKEND={backend}; the keras peer needs KERAS_BACKEND=torch before import")
    try:
        import keras
    except ImportError as error:
        raise PeerUnavailable(f"keras cannot be imported ({error})") from error
    if keras.backend.backend() != "torch":
        raise PeerUnavailable(f"keras was already imported with the {keras.backend.backend()} backend; "
                              "the keras peer needs KERAS_BACKEND=torch set before keras is first imported")
    return keras


def _inception_candidates(config: BenchmarkConfig, workload: Workload) -> list[Candidate]:
    """torchvision's Inception V3 at 299x299, for the paper's Table 3 (parameters, relative training speed)."""
    try:
        from torchvision.models import inception_v3
    except ImportError as error:
        raise PeerUnavailable(f"torchvision is not installed ({error})") from error
    model = inception_v3(weights=None, aux_logits=False, init_weights=False)
    return [module_candidate("torchvision inception_v3", model, config, img_size=INCEPTION_SIZE)]


def _runtime_candidates(runtime: str) -> Callable[[BenchmarkConfig, Workload], list[Candidate]]:
    """Our model run by another runtime (``onnxruntime``, ``openvino``), as ``xception deploy`` builds it, at each
    precision this machine runs natively; int8 calibrated on the workload's calibration images."""

    def candidates(config: BenchmarkConfig, workload: Workload) -> list[Candidate]:
        from ..deploy import CANDIDATES

        if config.mode != "inference" or config.device != "cpu":
            raise PeerUnavailable(f"{runtime} is timed in inference mode on the CPU only")
        chosen = [c for c in CANDIDATES if c.runtime == runtime]
        reasons = {c.name: c.unavailable() for c in chosen}
        if all(reasons.values()):
            raise PeerUnavailable("; ".join(f"{name}: {reason}" for name, reason in reasons.items()))
        model, x = workload.model, workload.x
        params, macs = count_params_and_macs(model, config.img_size, getattr(model, "in_chans", 3))
        with tempfile.TemporaryDirectory(prefix="xception-deploy-") as workdir:
            built = [(c, c.build(model, x, workload.calibration, Path(workdir)))
                     for c in chosen if reasons[c.name] is None]
        return [Candidate(c.name, "NCHW", lambda runner=runner: runner(x), config.img_size, params=params, macs=macs,
                          precision=c.precision, predict=runner) for c, runner in built]

    return candidates


RUNTIME_PEERS = ("onnxruntime", "openvino")  # the peers that run our model, so its weights: agreement applies
PEERS: dict[str, Callable[[BenchmarkConfig, Workload], list[Candidate]]] = {
    "timm": _timm_candidates,
    "keras": _keras_candidates,
    "inception_v3": _inception_candidates,
    "onnxruntime": _runtime_candidates("onnxruntime"),
    "openvino": _runtime_candidates("openvino"),
}


def _deployed_candidate(name: str, config: BenchmarkConfig, workload: Workload, candidate: str) -> Candidate:
    """Ours as :func:`xception.deploy.optimize_for_inference` makes it for ``candidate`` (a precision, with
    "+compile" to compile), fed the same contiguous NCHW float batch as the eager candidates (its own cast and
    layout change are part of its time)."""
    from ..deploy import optimize_for_inference

    module, x = workload.model.to(config.device).eval(), workload.x
    params, macs = count_params_and_macs(module, config.img_size, getattr(module, "in_chans", 3))
    precision, _, compile = candidate.partition("+")
    calibration = workload.calibration if precision == "int8" else None
    deployed = optimize_for_inference(module, precision, calibration, example_input=x, compile=bool(compile))
    compiled = "compile_s" in deployed.report
    return Candidate(f"{name} deploy{' compiled' if compiled else ''}",
                     "channels_last" if deployed.channels_last else "contiguous",
                     lambda: deployed(x), config.img_size, params=params, macs=macs, compiled=compiled,
                     precision=precision, compile_s=deployed.report.get("compile_s"), predict=deployed)


def compare(config: BenchmarkConfig, peers: Sequence[str] = ("timm", "keras", "inception_v3"), *,
            limits: dict[str, Any] | None = None, real: RealImages | None = None) -> list[Result]:
    """Time ``config.model`` and its peers interleaved in one process: ours first, then ours deployed at each
    ``config.deploy`` precision, then each peer in order.

    timm is timed in both layouts and reported in the faster (the other's speed goes in ``note``). Each
    result gets ``ratio_vs_timm`` (its throughput over timm's best) and ``ratio_vs_ours``; a peer that cannot
    run is a result with ``skipped`` set. With ``real``, ours is ``real.model`` (``config.img_size`` and batch are
    the real images'), the peers can only be other runtimes of it (:data:`RUNTIME_PEERS`), and every row gets its
    ``agreement`` with the eager fp32 model on ``real.held_out``.
    """
    unknown = [peer for peer in peers if peer not in PEERS]
    if unknown:
        raise InvalidArgumentError(f"unknown peer(s) {unknown}; available peers: {', '.join(PEERS)}")
    foreign = [peer for peer in peers if peer not in RUNTIME_PEERS]
    if real is not None and foreign:
        raise InvalidArgumentError(f"{', '.join(foreign)} cannot run a trained model's weights: with real images the "
                                   f"peers are other runtimes of the model ({', '.join(RUNTIME_PEERS)})")
    check_device(config.device)
    with intra_op_threads(config.num_threads):
        workload = Workload.of(config, real)
        held_out = None if real is None else real.held_out.to(config.device)
        reference = None if real is None else batched_outputs(workload.model, held_out, config.batch_size)
        # A group is one candidate's layouts (the faster is reported) or a skipped peer's result.
        groups: list[list[Candidate] | Result] = [
            [_deployed_candidate(config.model, config, workload, candidate)] for candidate in config.deploy]
        for peer in peers:
            try:
                candidates = PEERS[peer](config, workload)
            except PeerUnavailable as reason:
                groups.append(_skipped_result(peer, config, str(reason)))
                continue
            # Candidates of one name are one model in several layouts (timm's); other names are rows of their own.
            groups += [list(group) for _, group in itertools.groupby(candidates, key=lambda c: c.name)]
        # Ours is timed first but prepared last: module_candidate changes the model's layout in place, and the
        # other candidates are made from the model as created.
        groups.insert(0, [module_candidate(config.model, workload.model, config, example=workload.x)])
        timed = [c for group in groups if isinstance(group, list) for c in group]
        measured = iter(run_interleaved(timed, config))
        if real is not None:
            measured = iter([_with_agreement(result, candidate, held_out, reference, real, config.batch_size)
                             for result, candidate in zip(measured, timed, strict=True)])
    results = [group if isinstance(group, Result) else _fastest([next(measured) for _ in group]) for group in groups]
    return [with_peak_fraction(result, limits, config) for result in _with_ratios(results)]


def _with_agreement(result: Result, candidate: Candidate, held_out: torch.Tensor, reference: torch.Tensor,
                    real: RealImages, batch_size: int) -> Result:
    """``result`` with the share of the ``held_out`` images (on the device) on which ``candidate`` agrees with the
    eager fp32 model's ``reference`` outputs."""
    if candidate.predict is None:
        return result
    outputs = batched_outputs(candidate.predict, held_out, batch_size)
    measured = real.agreement.measure(reference, outputs, real.labels)
    return dataclasses.replace(result, agreement=measured["agreement"])


def _fastest(group: list[Result]) -> Result:
    """The faster layout of one candidate, noting the other layouts' throughput."""
    best = max(group, key=lambda result: result.images_per_s or 0.0)
    others = [f"{r.layout}: {r.images_per_s:.3g} img/s" for r in group if r is not best]
    return dataclasses.replace(best, note="; ".join(others)) if others else best


def _with_ratios(results: list[Result]) -> list[Result]:
    """Ratios to timm's best and to ours, which is the first result."""
    ours = results[0].images_per_s
    timm = next((r.images_per_s for r in results if r.candidate == "timm legacy_xception"), None)
    return [dataclasses.replace(result, ratio_vs_timm=_ratio(result.images_per_s, timm),
                                ratio_vs_ours=_ratio(result.images_per_s, ours))
            for result in results]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _skipped_result(peer: str, config: BenchmarkConfig, reason: str) -> Result:
    return Result(candidate=peer, layout="-", mode=config.mode, precision=config.precision, device=config.device,
                  batch_size=config.batch_size, img_size=config.img_size, skipped=reason)
