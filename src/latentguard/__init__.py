"""latentguard: read and steer the hidden states of open LLMs to make them safe and useful.

Data flows one way: models -> hooks (taps, edits) -> directions/artifacts -> defenses/training
-> eval -> report; `cli` and `serve` sit on top.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
