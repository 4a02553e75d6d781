"""Load a vision-language checkpoint's processor (the image processor, tokenizer and chat template that
turn images and messages into model inputs)."""

from __future__ import annotations

import json
from pathlib import Path


def load_processor(path: str | Path, **kwargs):
    """``AutoProcessor.from_pretrained(path)``, also where a processor's only unmet need is torchvision.

    transformers 5.x loads (and type-checks) the video processor of every processor that has one, e.g.
    Qwen2-VL's, even for image-only use, and video processors exist only with torchvision; on a machine
    without it (the CPU CI: PyPI's torchvision wheels need CUDA torch) this builds the same processor class
    from the checkpoint's tokenizer, image processor and chat template with no video processor: images and
    text work, videos raise. ``kwargs`` (e.g. ``trust_remote_code``) go to each ``from_pretrained``.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    path = Path(path)
    config_file = path / "processor_config.json"
    name = json.loads(config_file.read_text()).get("processor_class") if config_file.exists() else None
    base = getattr(transformers, name, None) if name else None
    if is_torchvision_available() or base is None or "video_processor" not in base.get_attributes():
        return AutoProcessor.from_pretrained(path, **kwargs)

    class ImageOnlyProcessor(base):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None  # the base class check would need torchvision's video processor class
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = base.__name__  # saves as the base
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    template = path / "chat_template.jinja"
    return ImageOnlyProcessor(image_processor=AutoImageProcessor.from_pretrained(path, **kwargs), tokenizer=tokenizer,
                              video_processor=None,
                              chat_template=template.read_text() if template.exists() else tokenizer.chat_template)
