"""rlspec: RL post-training that makes reasoning LLMs think efficiently.

Same accuracy with far fewer tokens, trained fast. See README.md.
"""

__version__ = "0.1.0"
