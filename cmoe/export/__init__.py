"""Export of carved models to standard MoE architectures (one file per format, registered in EXPORT_FORMATS)."""

from cmoe.export.base import EXPORT_FORMATS, CarvedView, ExportFormat, check_exportable, check_options_exportable
from cmoe.export import qwen2_moe  # noqa: F401  (each import registers its format)
from cmoe.export import mixtral  # noqa: F401
from cmoe.export import glm4_moe  # noqa: F401
from cmoe.export import ernie4_5_moe  # noqa: F401
from cmoe.export.writer import export_model, run_export

__all__ = [
    "EXPORT_FORMATS",
    "CarvedView",
    "ExportFormat",
    "check_exportable",
    "check_options_exportable",
    "export_model",
    "run_export",
]
