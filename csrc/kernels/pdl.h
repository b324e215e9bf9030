// Programmatic dependent launch (PDL, compute capability 9.0 and later) for the decode kernels.
//
// A decode step is some 230 short kernels back to back. Launched with PDL, a kernel may start
// while the kernel before it on the stream is still running: its thread blocks are scheduled as
// soon as every block of the previous kernel has started, do the work that depends on nothing
// the previous kernel writes (the linear kernel streams its first weights), then wait for the
// previous kernel to finish and its writes to be visible (griddepcontrol.wait) before touching
// anything else. The launch gap and the previous kernel's tail then overlap real work.
//
// Every kernel launched this way waits before it reads an activation or writes anything; what it
// reads before the wait (weights) must not be written by a kernel running just before it.
#pragma once

namespace dejavu {

// -1: from the environment (DEJAVU_PDL=0 turns it off; default on), 0: off, 1: on. Kernels use
// PDL only where it is on and their code was compiled for compute capability 9.0 or later.
void set_programmatic_launch(int mode);
// Whether launches ask for PDL (the setting above, before the per-kernel check).
bool programmatic_launch();
// Whether a kernel of this build launched now on the current device would use PDL: the setting is
// on, the device is 9.0+ and the code it runs was compiled for 9.0+ (not the generic PTX). False
// without a CUDA build or device. A guard against a build that silently loses PDL.
bool programmatic_launch_active();

}  // namespace dejavu
