"""Models: which one `--model` names (`resolve`), its identity (`fingerprint`), GGUF conversion
(`convert`), and loading it for ra's engine with a weight format chosen per device (`load`)."""

from ra_cli.model.fingerprint import Fingerprint
from ra_cli.choices import ComputeDtype
from ra_cli.model.load import LoadedModel, dtype_name, load_model, pick_device, pick_dtype, plan
from ra_cli.model.resolve import (EMBEDDED_NAME, INSTALL_HINT, NAMED, ModelSpec, downloads_dir, embedded_gguf_path,
                                  resolve_model)
from ra_cli.paths import models_dir

__all__ = ["ComputeDtype", "EMBEDDED_NAME", "Fingerprint", "INSTALL_HINT", "LoadedModel", "ModelSpec", "NAMED",
           "downloads_dir", "dtype_name", "embedded_gguf_path", "load_model", "models_dir", "pick_device",
           "pick_dtype", "plan", "resolve_model"]
