"""Merge methods and their registry."""

from lorakit.methods.base import GroupInput, GroupOutput, MergeMethod, Parameter
from lorakit.methods.registry import get_method, method_names, register_method

__all__ = ["GroupInput", "GroupOutput", "MergeMethod", "Parameter", "get_method", "method_names", "register_method"]
