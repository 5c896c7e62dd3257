// Stand-in for the CUDA runtime header when the kernels run in the test emulator (see emu.h).
#pragma once
#include "emu.h"
