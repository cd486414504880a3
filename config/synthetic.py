# The embedded default: a tiny HMMC trained from scratch on the built-in synthetic dataset, on CPU. Every value is
# train.py's default; this file says why they are what they are.
# $ python train.py                      (the same as: python train.py config/synthetic.py)
# $ python train.py --use_temp=False --out_dir=out-synthetic-notemp   (the frame-level baseline: cannot see
#   direction or order; its own out_dir, as out-synthetic holds the run above)
# $ python train.py config/synthetic_zh.py   (the same run in Chinese, with a BERT from scratch)
# Two CPU cores, a few minutes: 6,000 training videos / 32 per step = 187 steps per epoch, 9 epochs = 1,683 steps;
# 32 videos per step on any number of processes (torchrun --nproc_per_node=2 gives 16 per rank).
# The data is made by `python prepare.py synthetic` (train.py makes it when missing); the longest caption is 14
# tokens with SOT and EOT (context_length 16). num_workers 0: decoding 32-px JPEGs is cheap, and worker processes
# would only compete for the two cores.
# 64-wide towers, 2 layers each for vision, text and the temporal transformer. The ViT takes each 32-px frame as
# ONE patch: its linear patch embedding sees exact object positions, which is what motion is made of; with 8-px
# patches the tiny model learned colour and shape but, within the CPU budget, no motion at all
# The video towers learn from scratch at 1e-3, the CLIP text tower from scratch 10x slower: at the same rate it can
# fold together the words for what the video tower cannot see yet (a caption and its time-reversed twin), and the
# run then ends near the frame-level floor (one of three seeds in docs/results.md). Moving slowly, the text tower
# keeps the words apart until the video tower can tell them.
# 9 epochs, not 6: at 6, three of ten English and Chinese runs ended below T2V R@1 60 (40.7 the lowest); at 9 none
# ended below 64.2 (docs/results.md, "Training length").
