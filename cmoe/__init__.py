"""cmoe: carve a dense LLaMA-style model into a Mixture-of-Experts without training.

Importing cmoe registers the carved architecture with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(carved_dir)` works without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from cmoe.configuration_cmoe import CMoEConfig
from cmoe.modeling_cmoe import CMoEBlock, CMoEForCausalLM

AutoConfig.register(CMoEConfig.model_type, CMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(CMoEConfig, CMoEForCausalLM, exist_ok=True)

from cmoe.carved_io import load_carved  # noqa: E402  (needs the registration above)
from cmoe.config import MoEShape  # noqa: E402
from cmoe.errors import CmoeError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CMoEBlock", "CMoEConfig", "CMoEForCausalLM", "CmoeError", "MoEShape", "load_carved", "__version__"]
