# Evaluate the released MSR-VTT fine-tuned HMMC (a state dict of the original code) as it was evaluated:
# $ python eval.py config/eval_original_msrvtt.py --init_from=pytorch_model.bin.4
# An original state dict carries no training config, so the protocol is all here: 12 uniformly sampled frames at
# 224 px, 32-token captions, top-2 frames (the original README's MSR-VTT command passes --top_frames 2).
# Precision: the original encoded with CLIP's weights in fp16; the closest here is fp16 autocast (the JSON records it
# as encode_dtype; a CPU encodes in fp32). The similarity and the ranking always run in fp32 without TF32.
dataset = "msrvtt"
split = "test"
caption_field = "captions"
num_frames = 12
image_size = 224
context_length = 32
top_k_frames = 2
frame_match_weight = 1.0
dtype = "float16"
