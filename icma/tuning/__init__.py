"""In-context molecule tuning (ICMT, ICMA's third stage): LoRA or full fine-tuning on prompts
built from leak-free retrieved contexts, exactly as serving builds them.

``tune(TuneConfig(...), settings=...)`` runs it; ``icma tune`` and the worker's tune jobs call it.
"""

from icma.tuning.config import TuneConfig, parse_config, read_config_file  # noqa: F401
from icma.tuning.loop import Stopped  # noqa: F401
from icma.tuning.run import tune  # noqa: F401
