"""ComfyUI entry point of the HDM node pack. Outside ComfyUI (pytest imports this file because the repository
root is a package) it defines nothing and imports nothing: it only looks at modules ComfyUI has already loaded."""

import sys

if "comfy.model_management" in sys.modules and "folder_paths" in sys.modules:  # running inside ComfyUI
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
