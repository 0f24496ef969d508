"""Offline tools that load a model with transformers: DuoAttention head identification
(`duo_train`, `kvkit identify-heads`) and CSKV bases calibration (`calibrate_cskv`). They sit
above the library (they use `kvkit.evaluate` and `kvkit.models`); nothing in the core imports
them.
"""
