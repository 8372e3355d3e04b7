"""Score vocabularies (ALP, compression, ...), pick the knee, audit tokenizers, plots and reports."""
