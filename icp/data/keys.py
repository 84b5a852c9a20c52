"""The batch contract: the only thing data and tasks share.

A training batch is a ``dict[str, Tensor]``. Images are float tensors in [-1, 1], shape
(B, 3, H, W); masks are float {0, 1}, shape (B, 1, H, W). "Profile" is the identity photo
``I_p``; "target" is the portrait ``I_l`` whose pose and lighting the output keeps (paper §3).

Flow convention (used by the renderer, the matching maths and the metrics alike): a flow is
(B, 2, H, W) in *pixels*, channel 0 = x (width), channel 1 = y (height). ``FLOW_GT[b, :, y, x]``
is the displacement from target pixel (x, y) to its corresponding profile pixel, so sampling the
profile at ``(x, y) + flow`` warps the profile into the target's pose.
"""

# -- images (B, 3, H, W) in [-1, 1]
PROFILE = "profile"                # I_p: the identity view
TARGET = "target"                  # I_l: ground-truth target view (same identity, other pose/light)
TARGET_MASKED = "target_masked"    # I'_l: the target after random patch masking (masked pixels = 0)

# -- masks (B, 1, H, W) in {0, 1}
TARGET_KEEP = "target_keep"        # 1 where the target pixel survived masking
PROFILE_FG = "profile_fg"          # foreground (head) mask of the profile view
TARGET_FG = "target_fg"            # foreground (head) mask of the target view

# -- ground-truth correspondence (synthetic data only)
PROFILE_COORDS = "profile_coords"  # (B, 3, H, W) canonical surface coordinates, 0 on background
TARGET_COORDS = "target_coords"    # (B, 3, H, W)
FLOW_GT = "flow_gt"                # (B, 2, H, W) target -> profile, pixels (see module docstring)
FLOW_VALID = "flow_valid"          # (B, 1, H, W) 1 where the target pixel is visible in the profile

# -- parameters
IDENTITY = "identity"              # (B,) int64 identity index
PROFILE_POSE = "profile_pose"      # (B, 3) yaw, pitch, roll in degrees
TARGET_POSE = "target_pose"        # (B, 3)
PROFILE_LIGHT = "profile_light"    # (B, L) light parameters (renderer-defined layout, see render.py)
TARGET_LIGHT = "target_light"      # (B, L)
PROFILE_LANDMARKS = "profile_landmarks"  # (B, K, 2) pixel x, y
TARGET_LANDMARKS = "target_landmarks"    # (B, K, 2)
PROFILE_LANDMARKS_VISIBLE = "profile_landmarks_visible"  # (B, K) bool: landmark seen (in frame, not occluded)
TARGET_LANDMARKS_VISIBLE = "target_landmarks_visible"    # (B, K) bool
PROMPT = "prompt"                  # list[str] text prompt per sample (not a tensor)
