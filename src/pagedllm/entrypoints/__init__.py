"""How users reach the engine: the offline LLM class and the command line."""
