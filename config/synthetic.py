# The embedded default: a tiny HMMC trained from scratch on the built-in synthetic dataset, on CPU.
# $ python train.py                      (the same as: python train.py config/synthetic.py)
# $ python train.py --use_temp=False --out_dir=out-synthetic-notemp   (the frame-level baseline: cannot see
#   direction or order; its own out_dir, as out-synthetic holds the run above)
# $ python train.py config/synthetic_zh.py   (the same run in Chinese, with a BERT from scratch)
# Two CPU cores, a few minutes: 6,000 training videos / 32 per step = 187 steps per epoch, 6 epochs = 1,122 steps.
# The values repeat train.py's defaults so that this file documents the run and stays in step with it.
out_dir = "out-synthetic"
dataset = "synthetic"  # made by `python prepare.py synthetic` (train.py makes it when missing)
init_from = "scratch"
num_frames = 8
image_size = 32
context_length = 16  # the longest synthetic caption is 14 tokens with SOT and EOT
eval_context_length = 16
# 64-wide towers, 2 layers each for vision, text and the temporal transformer. The ViT takes each 32-px frame as
# ONE patch: its linear patch embedding sees exact object positions, which is what motion is made of; with 8-px
# patches the tiny model learned colour and shape but, within the CPU budget, no motion at all (test R@1 8.8 either way)
embed_dim = 64
vision_width = 64
vision_layers = 2
vision_patch_size = 32
transformer_width = 64
transformer_heads = 2
transformer_layers = 2
temporal_layers = 2
use_temp = True
use_frame_fea = True
top_k_frames = 3
frame_match_weight = 1.0
# 32 videos per step on any number of processes (torchrun --nproc_per_node=2 gives 16 per rank)
batch_size = 32
gradient_accumulation_steps = 1
epochs = 6
learning_rate = 1e-3  # the video towers, from scratch
clip_lr_scale = 1.0
# The CLIP text tower from scratch learns 10x slower than the video towers. At the same rate it folds together the
# words for what the video tower cannot see yet (a caption and its time-reversed twin end at cosine 0.9-1.0), the
# video tower is left with nothing to learn motion from, and the run ends near the frame-level floor at most seeds.
# Moving slowly, the text tower keeps the words apart until the video tower can tell them (docs/results.md).
text_lr = 1e-4
weight_decay = 0.2
warmup_proportion = 0.1
eval_interval = 300
log_interval = 25
num_workers = 0  # decoding 32-px JPEGs is cheap; worker processes would only compete for the two cores
