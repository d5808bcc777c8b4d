# A video diffusion transformer with its text prompt in the sequence, as in CogVideoX (Yang et al., 2024,
# "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer"): 226 text tokens come before the
# video latent's tokens and the model attends over both jointly. Sparse form: the text tokens attend to
# everything and every token attends to them (the prompt conditions every frame), while a video token
# attends to a kt x ks x ks 3-D neighborhood of the latent (neighborhood attention, Hassani et al., 2023,
# "Neighborhood Attention Transformer"). The latent is 16 frames of 32 x 32 tokens; CogVideoX-5B's is
# 13 x 30 x 45 (-D frames=13 -D height=30 -D width=45). The compiler tiles the video tokens in boxes and
# keeps the text tokens contiguous before them.
param text = 226
param frames = 16
param height = 32
param width = 32
param kt = 3
param ks = 9
layout video = grid(frames, height, width, prefix=text)
pattern video_dit = neighborhood(video, kernel=(kt, ks, ks)) | global(video.prefix)
