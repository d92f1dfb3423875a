# SPDX-License-Identifier: Apache-2.0
"""`vkv serve`: an OpenAI-compatible HTTP server over vkv engines (needs FastAPI + uvicorn: ``vkv[serve]``)."""

from .app import create_app as create_app
from .app import serve as serve
