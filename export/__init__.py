"""export/: the merged checkpoint in other formats. `graft export gguf` (llama.cpp's own converter)."""
