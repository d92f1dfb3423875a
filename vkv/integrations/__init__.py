# SPDX-License-Identifier: Apache-2.0
"""Integrations of vkv with other libraries, each imported only when asked for (``import vkv.integrations.hf``)."""
