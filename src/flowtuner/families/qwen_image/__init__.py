"""The Qwen-Image family (text-to-image). Qwen-Image-Edit will be a sibling reusing these loaders."""

from flowtuner.families.qwen_image.family import QwenImageFamily

__all__ = ["QwenImageFamily"]
