"""Deployment: a trained model made fast for inference, in PyTorch (:func:`optimize_for_inference`), ONNX Runtime
or OpenVINO, at fp32, bf16 or int8 (:mod:`.runtimes` lists the candidates), checked against fp32 (:mod:`.agreement`)
and written to a folder that :func:`load_deployed` reads back (:mod:`.artifact`). Choosing the fastest correct
candidate is a measurement: :func:`xception.benchmark.selection.choose_deployment`."""

from .agreement import AGREEMENTS, MeanIoUAgreement, TopOneAgreement
from .artifact import DEPLOY_FILE, Deployment, load_deployed, read_record, write_deployment
from .base import RuntimeModel, RuntimeUnavailable
from .onnx import OnnxRuntimeModel, check_onnx, export_onnx
from .openvino import OpenVinoModel
from .runtimes import CANDIDATE_NAMES, CANDIDATES, RuntimeCandidate, get_candidate
from .torch_path import (
    CALIBRATION_BATCHES,
    DeployedModel,
    fold_batchnorm,
    optimize_for_inference,
)

__all__ = [
    "AGREEMENTS",
    "CALIBRATION_BATCHES",
    "CANDIDATES",
    "CANDIDATE_NAMES",
    "DEPLOY_FILE",
    "DeployedModel",
    "Deployment",
    "MeanIoUAgreement",
    "OnnxRuntimeModel",
    "OpenVinoModel",
    "RuntimeCandidate",
    "RuntimeModel",
    "RuntimeUnavailable",
    "TopOneAgreement",
    "check_onnx",
    "export_onnx",
    "fold_batchnorm",
    "get_candidate",
    "load_deployed",
    "optimize_for_inference",
    "read_record",
    "write_deployment",
]
