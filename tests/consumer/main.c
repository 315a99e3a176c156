/* Links SFR::sfr from the installed package and checks that library, header and CMake package
 * agree on the version. Runs without LD_LIBRARY_PATH (ctest clears it). */
#include <sfr.h>
#include <stdio.h>
#include <string.h>

int main(void) {
  const char *lib = sfr_version();
  printf("libsfr %s, header %s, CMake package %s\n", lib, SFR_VERSION, SFR_PACKAGE_VERSION);
  if (strcmp(lib, SFR_VERSION) != 0 || strcmp(lib, SFR_PACKAGE_VERSION) != 0) {
    fprintf(stderr, "version mismatch\n");
    return 1;
  }
  size_t dims[3] = {4, 4, 4}, n_row = 0, n_col = 0;
  if (sfr_stitch_layout(dims, 16, &n_row, &n_col) != SFR_OK || n_row != 4 || n_col != 4) {
    char msg[256];
    sfr_last_error_message(msg, sizeof msg);
    fprintf(stderr, "sfr_stitch_layout: %s\n", msg);
    return 1;
  }
  return 0;
}
