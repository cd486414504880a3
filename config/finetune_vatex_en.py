# Fine-tune HMMC on VATEX with the English captions (25,991 train videos x 10 captions; 1,500 val / 1,500 test).
# $ torchrun --standalone --nproc_per_node=8 train.py config/finetune_vatex_en.py
# Needs data/vatex (python prepare.py frames --videos=VATEX_VIDEOS --out=data/vatex/frames.lmdb and
# python prepare.py vatex ... --out=data/vatex) and the English pre-training checkpoint, or --init_from=clip.
# The README gives no VATEX fine-tuning command (only the test run, with top_frames left at 3); this recipe uses the
# MSR-VTT one. Batch: 256 videos per step = 32 per GPU x 8 GPUs x 1.
# 259,910 captions / 256 = 1,015 steps per epoch, 5 epochs = 5,075 steps, 10% warm-up.
out_dir = "out-finetune-vatex-en"
dataset = "vatex"
init_from = "out-pretrain-chvtt-en/ckpt.pt"
clip_path = "ViT-B-32.pt"
text_encoder = "clip"
caption_field = "captions"
pretrain = False
num_frames = 12
image_size = 224
context_length = 32
frame_sample = "random"
use_temp = True
temporal_layers = 4
use_frame_fea = True
weight_video = 0.85
weight_frame = 0.15
top_k_frames = 3
frame_match_weight = 1.0
batch_size = 256
gradient_accumulation_steps = 1
epochs = 5
learning_rate = 1e-4
text_lr = 1e-7
clip_lr_scale = 1e-3
weight_decay = 0.2
warmup_proportion = 0.1
eval_batch_size = 256
num_workers = 8
log_interval = 50
eval_interval = 1015
