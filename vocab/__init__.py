"""Train candidate SentencePiece BPE vocabularies, merge one into a base tokenizer, export HF folders."""
