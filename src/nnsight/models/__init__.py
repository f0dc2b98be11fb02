"""Model wrappers: ``NNsight`` for any module, ``LanguageModel`` for Hugging Face causal LMs."""
