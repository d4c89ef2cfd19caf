"""The three LightningModules of dynlab, on one shallow base."""

from dynlab.modules.base import CausalLMModule
from dynlab.modules.dpo import DPOModule
from dynlab.modules.sft import ExtendSFTModule, SFTModule

__all__ = ["CausalLMModule", "DPOModule", "ExtendSFTModule", "SFTModule"]
