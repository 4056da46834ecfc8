import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from lib_controlnet.cli import main  # noqa: E402

sys.exit(main())
