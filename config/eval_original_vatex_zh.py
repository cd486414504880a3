# Evaluate the released Chinese VATEX fine-tuned HMMC (a state dict of the original code) as it was evaluated:
# $ python eval.py config/eval_original_vatex_zh.py --init_from=pytorch_model.bin.4 --bert_vocab=vocab.txt
# (vocab.txt of hfl/chinese-roberta-wwm-ext). An original state dict carries no training config, so the protocol is
# all here: 12 frames, 224 px, 32-token captions, top-3 frames (the original's default; its VATEX test command
# leaves --top_frames unset).
dataset = "vatex"
split = "test"
caption_field = "captions_zh"
num_frames = 12
image_size = 224
context_length = 32
top_k_frames = 3
frame_match_weight = 1.0
# The original's VATEX loader wrapped every caption in CLIP's start/end strings, which the BERT vocabulary maps to
# [UNK]: the released model was fine-tuned and tested on `[UNK] ... [UNK]` (no [CLS]/[SEP]) and its pooler reads
# [UNK]. On for the released weights only; off (eval.py's default) for checkpoints trained here.
bert_unk_input = True
# Precision: the original encoded with CLIP's weights in fp16; the closest here is fp16 autocast (the JSON records it
# as encode_dtype; a CPU encodes in fp32). The similarity and the ranking run in fp32 without TF32.
dtype = "float16"
