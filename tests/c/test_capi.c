/* Exercises every function of the C API (include/sfr.h), including misuse: NULL pointers,
 * freed, foreign and wrong-kind handles, bad JSON, unknown config keys, wrong dims or dtype,
 * short buffers, cancel twice, wait twice, double free. Every expected failure must return the
 * expected status AND leave a message naming the problem; outputs must stay untouched.
 * ctest runs it under valgrind memcheck (zero errors, zero definite leaks).
 * Exit status: 0 when every check passed. */
#include <sfr.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int failures = 0;
static int checks = 0;
static char msg[2048];

#define CHECK(cond)                                                                  \
  do {                                                                               \
    checks++;                                                                        \
    if (!(cond)) {                                                                   \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);       \
      failures++;                                                                    \
    }                                                                                \
  } while (0)

static const char *last_error(void) {
  sfr_last_error_message(msg, sizeof msg);
  return msg;
}

static const char *status_name(sfr_status s) {
  static const char *names[] = {"SFR_OK", "SFR_ERR_NULL_POINTER", "SFR_ERR_INVALID_ARGUMENT",
                                "SFR_ERR_BUFFER_TOO_SMALL", "SFR_ERR_IO", "SFR_ERR_FORMAT",
                                "SFR_ERR_CANCELLED", "SFR_ERR_TORCH", "SFR_ERR_BAD_HANDLE",
                                "SFR_ERR_STATE", "SFR_ERR_PANIC"};
  return (unsigned)s <= SFR_ERR_PANIC ? names[s] : "?";
}

/* The call must return `want`; for a failure, the message must contain `needle`. */
static void expect(sfr_status got, sfr_status want, const char *needle, const char *expr, int line) {
  checks++;
  if (got != want) {
    fprintf(stderr, "line %d: %s returned %s, expected %s (last error: %s)\n", line, expr,
            status_name(got), status_name(want), last_error());
    failures++;
    return;
  }
  if (want == SFR_OK) return;
  last_error();
  if (msg[0] == 0 || (needle && !strstr(msg, needle))) {
    fprintf(stderr, "line %d: %s: message \"%s\" lacks \"%s\"\n", line, expr, msg, needle ? needle : "");
    failures++;
  } else {
    printf("  %-25s %s\n", status_name(want), msg);
  }
}
#define EXPECT(call, want, needle) expect((call), (want), (needle), #call, __LINE__)
#define OK(call) expect((call), SFR_OK, NULL, #call, __LINE__)

static sfr_volume_view view(const void *data, size_t len, sfr_dtype dtype, size_t nx, size_t ny, size_t nz) {
  sfr_volume_view v;
  memset(&v, 0, sizeof v);
  v.data = data;
  v.data_len = len;
  v.dtype = dtype;
  v.dims[0] = nx;
  v.dims[1] = ny;
  v.dims[2] = nz;
  for (int a = 0; a < 3; a++) v.spacing[a] = 1.0;
  v.direction[0] = v.direction[4] = v.direction[8] = 1.0;
  return v;
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* ---------------------------------------------------------------- synthetic cases */
enum { NX = 20, NY = 18, NZ = 12, NVOX = NX * NY * NZ };

static unsigned lcg(unsigned *s) { return *s = *s * 1664525u + 1013904223u; }

/* A bright ball (label 1) on a darker, noisy background. */
static void make_case(unsigned seed, float *img, uint8_t *lab) {
  unsigned s = seed;
  double cx = 8 + lcg(&s) % 5, cy = 7 + lcg(&s) % 4, cz = 5 + lcg(&s) % 3, r = 3.5 + (lcg(&s) % 3);
  for (int k = 0; k < NZ; k++)
    for (int j = 0; j < NY; j++)
      for (int i = 0; i < NX; i++) {
        size_t n = (size_t)i + (size_t)NX * (j + (size_t)NY * k);
        double d = sqrt((i - cx) * (i - cx) + (j - cy) * (j - cy) + (k - cz) * (k - cz));
        int in = d <= r;
        double noise = ((lcg(&s) >> 8) % 1000) / 1000.0 - 0.5;
        img[n] = (float)(in ? 100.0 + 10 * noise : 30.0 + 10 * noise);
        if (lab) lab[n] = (uint8_t)in;
      }
}

/* ---------------------------------------------------------------- version and errors */
static void *thread_fresh_error(void *arg) {
  (void)arg;
  /* The last error is per thread: a new thread has none. */
  return (void *)(size_t)sfr_last_error_message(NULL, 0);
}

static void test_version_and_errors(void) {
  printf("version and last error\n");
  const char *v = sfr_version();
  CHECK(v != NULL && strcmp(v, SFR_VERSION) == 0);
  char want[32];
  snprintf(want, sizeof want, "%d.%d.%d", SFR_VERSION_MAJOR, SFR_VERSION_MINOR, SFR_VERSION_PATCH);
  CHECK(strcmp(want, SFR_VERSION) == 0);

  EXPECT(sfr_dataset_counts(NULL, NULL, NULL), SFR_ERR_NULL_POINTER, "sfr_dataset_counts: ds is NULL");
  size_t full = sfr_last_error_message(NULL, 0);
  CHECK(full == strlen("sfr_dataset_counts: ds is NULL") + 1);
  char small[5];
  memset(small, 'x', sizeof small);
  CHECK(sfr_last_error_message(small, sizeof small) == full);
  CHECK(strcmp(small, "sfr_") == 0); /* truncated and NUL-terminated */
  CHECK(sfr_last_error_message(NULL, 10) == full); /* NULL buffer: only the size */

  pthread_t t;
  void *ret = NULL;
  CHECK(pthread_create(&t, NULL, thread_fresh_error, NULL) == 0);
  pthread_join(t, &ret);
  CHECK((size_t)ret == 1);
}

/* ---------------------------------------------------------------- devices */
static int g_cuda_available = -1;

static void test_device_info(void) {
  printf("device info\n");
  size_t need = 0;
  EXPECT(sfr_device_info(NULL, 0, NULL), SFR_ERR_NULL_POINTER, "needed is NULL");
  EXPECT(sfr_device_info(NULL, 0, &need), SFR_ERR_BUFFER_TOO_SMALL, "needs");
  CHECK(need > 20);
  char small[8];
  memset(small, 'x', sizeof small);
  EXPECT(sfr_device_info(small, sizeof small, &need), SFR_ERR_BUFFER_TOO_SMALL, "the device information needs");
  CHECK(small[0] == 'x'); /* untouched */
  char *info = malloc(need);
  OK(sfr_device_info(info, need, &need));
  CHECK(strlen(info) == need - 1 && info[0] == '{');
  printf("  %s\n", info);
  CHECK(strstr(info, "\"library_version\":\"" SFR_VERSION "\"") != NULL);
  CHECK(strstr(info, "\"cuda_linked\":") != NULL && strstr(info, "\"libtorch_dir\":\"") != NULL);
  if (strstr(info, "\"cuda_available\":false")) {
    g_cuda_available = 0;
    /* Without a GPU "auto" is the CPU (and "cuda" is an error: test_models). */
    CHECK(strstr(info, "\"auto\":\"cpu\"") != NULL && strstr(info, "\"cuda_device_count\":0") != NULL);
  } else {
    CHECK(strstr(info, "\"cuda_available\":true") != NULL && strstr(info, "\"auto\":\"cuda:0\"") != NULL);
    g_cuda_available = 1;
  }
  free(info);
}

/* ---------------------------------------------------------------- volume views */
static void test_views(void) {
  printf("volume view checks\n");
  enum { W = 6, H = 5, D = 7 };
  uint16_t vol[W * H * D];
  for (int n = 0; n < W * H * D; n++) vol[n] = (uint16_t)n;
  float out[32 * 32];
  const size_t len = sizeof vol;
  sfr_volume_view v = view(vol, len, SFR_DTYPE_U16, W, H, D);

  EXPECT(sfr_stitch_image(NULL, 32, out, 1024), SFR_ERR_NULL_POINTER, "volume is NULL");
  sfr_volume_view b = v;
  b.data = NULL;
  EXPECT(sfr_stitch_image(&b, 32, out, 1024), SFR_ERR_NULL_POINTER, "volume->data is NULL");
  b = v;
  b.data_len = len - 1;
  EXPECT(sfr_stitch_image(&b, 32, out, 1024), SFR_ERR_INVALID_ARGUMENT, "data_len");
  b = v;
  b.dtype = SFR_DTYPE_U8; /* dims*1 byte != data_len: a wrong dtype is caught by the length */
  EXPECT(sfr_stitch_image(&b, 32, out, 1024), SFR_ERR_INVALID_ARGUMENT, "data_len");
  b = v;
  b.dtype = (sfr_dtype)42;
  EXPECT(sfr_stitch_image(&b, 32, out, 1024), SFR_ERR_INVALID_ARGUMENT, "unknown dtype 42");
  b = v;
  b.dims[1] = 0;
  EXPECT(sfr_stitch_image(&b, 32, out, 1024), SFR_ERR_INVALID_ARGUMENT, "zero size");
  b = v;
  b.dims[0] = b.dims[1] = b.dims[2] = (size_t)1 << 40;
  EXPECT(sfr_stitch_image(&b, 32, out, 1024), SFR_ERR_INVALID_ARGUMENT, "too large");
  b = v;
  b.spacing[2] = -1.0;
  EXPECT(sfr_stitch_image(&b, 32, out, 1024), SFR_ERR_INVALID_ARGUMENT, "spacing");
  b = v;
  b.direction[1] = 0.5; /* columns no longer orthonormal */
  EXPECT(sfr_stitch_image(&b, 32, out, 1024), SFR_ERR_INVALID_ARGUMENT, "orthonormal");
  b = v;
  b.origin[0] = NAN;
  EXPECT(sfr_stitch_image(&b, 32, out, 1024), SFR_ERR_INVALID_ARGUMENT, "finite");
}

/* ---------------------------------------------------------------- stitching */
static void test_stitch(void) {
  printf("stitching\n");
  enum { W = 6, H = 5, D = 7, S = 20 };
  size_t dims[3] = {W, H, D};
  size_t n_row = 0, n_col = 0;
  OK(sfr_stitch_layout(dims, S, &n_row, &n_col));
  CHECK(n_row == S / H && n_col == S / W); /* 4 x 3 = 12 cells for 7 slices */
  EXPECT(sfr_stitch_layout(NULL, S, &n_row, &n_col), SFR_ERR_NULL_POINTER, "dims is NULL");
  EXPECT(sfr_stitch_layout(dims, S, NULL, &n_col), SFR_ERR_NULL_POINTER, "n_row is NULL");
  EXPECT(sfr_stitch_layout(dims, 0, &n_row, &n_col), SFR_ERR_INVALID_ARGUMENT, "canvas");
  EXPECT(sfr_stitch_layout(dims, 4, &n_row, &n_col), SFR_ERR_INVALID_ARGUMENT, "does not fit");
  EXPECT(sfr_stitch_layout(dims, 10, &n_row, &n_col), SFR_ERR_INVALID_ARGUMENT, "holds at most 2");

  /* The layout of DESIGN.md: cells of (S/n_row) x (S/n_col), grid centred, slices centred in
   * their cells, (cells - D)/2 empty cells first. */
  size_t cell_h = S / n_row, cell_w = S / n_col;
  size_t off_h = (S - n_row * cell_h) / 2, off_w = (S - n_col * cell_w) / 2;
  size_t t_h = (cell_h - H) / 2, t_w = (cell_w - W) / 2, before = (n_row * n_col - D) / 2;

  uint16_t img[W * H * D];
  uint8_t lab[W * H * D];
  for (int n = 0; n < W * H * D; n++) {
    img[n] = (uint16_t)(1 + n); /* 1-based so that 0 means padding */
    lab[n] = (uint8_t)(n % 200);
  }
  sfr_volume_view vi = view(img, sizeof img, SFR_DTYPE_U16, W, H, D);
  sfr_volume_view vl = view(lab, sizeof lab, SFR_DTYPE_U8, W, H, D);
  static float canvas[S * S];
  static uint8_t lcanvas[S * S];
  int covered[S * S];
  memset(covered, 0, sizeof covered);
  for (size_t n = 0; n < S * S; n++) canvas[n] = -7.0f;
  EXPECT(sfr_stitch_image(&vi, S, canvas, S * S - 1), SFR_ERR_BUFFER_TOO_SMALL, "needs 400");
  CHECK(canvas[0] == -7.0f && canvas[S * S - 2] == -7.0f); /* untouched */
  EXPECT(sfr_stitch_image(&vi, S, NULL, S * S), SFR_ERR_NULL_POINTER, "out is NULL");
  OK(sfr_stitch_image(&vi, S, canvas, S * S));
  OK(sfr_stitch_labels(&vl, S, lcanvas, S * S));
  int placed_ok = 1;
  for (size_t k = 0; k < D; k++) {
    size_t p = k + before, r0 = off_h + (p / n_col) * cell_h + t_h, c0 = off_w + (p % n_col) * cell_w + t_w;
    for (size_t j = 0; j < H; j++)
      for (size_t i = 0; i < W; i++) {
        size_t c = (r0 + j) * S + c0 + i, n = i + W * (j + H * k);
        covered[c] = 1;
        placed_ok &= canvas[c] == (float)img[n] && lcanvas[c] == lab[n];
      }
  }
  CHECK(placed_ok);
  int pad_ok = 1;
  for (size_t c = 0; c < S * S; c++)
    if (!covered[c]) pad_ok &= canvas[c] == 0.0f && lcanvas[c] == 255;
  CHECK(pad_ok);

  sfr_volume_view vbad = view(img, sizeof img, SFR_DTYPE_U16, W, H, D);
  EXPECT(sfr_stitch_labels(&vbad, S, lcanvas, S * S), SFR_ERR_INVALID_ARGUMENT, "SFR_DTYPE_U8");
  EXPECT(sfr_stitch_labels(&vl, S, lcanvas, 10), SFR_ERR_BUFFER_TOO_SMALL, "needs 400");

  uint8_t back[W * H * D];
  memset(back, 0xEE, sizeof back);
  EXPECT(sfr_unstitch_labels(lcanvas, S * S - 1, S, dims, back, sizeof back), SFR_ERR_INVALID_ARGUMENT, "canvas_len");
  EXPECT(sfr_unstitch_labels(lcanvas, S * S, S, dims, back, sizeof back - 1), SFR_ERR_BUFFER_TOO_SMALL, "needs 210");
  EXPECT(sfr_unstitch_labels(NULL, S * S, S, dims, back, sizeof back), SFR_ERR_NULL_POINTER, "canvas_data is NULL");
  EXPECT(sfr_unstitch_labels(lcanvas, S * S, S, NULL, back, sizeof back), SFR_ERR_NULL_POINTER, "dims is NULL");
  CHECK(back[0] == 0xEE && back[sizeof back - 1] == 0xEE);
  OK(sfr_unstitch_labels(lcanvas, S * S, S, dims, back, sizeof back));
  CHECK(memcmp(back, lab, sizeof lab) == 0);
}

/* ---------------------------------------------------------------- datasets */
static float g_img[4][NVOX];
static uint8_t g_lab[4][NVOX];

static sfr_dataset *test_dataset(void) {
  printf("datasets\n");
  sfr_dataset *ds = NULL;
  EXPECT(sfr_dataset_new("{\"0\": \"bg\"", &ds), SFR_ERR_INVALID_ARGUMENT, "not JSON");
  EXPECT(sfr_dataset_new("[0, 1]", &ds), SFR_ERR_INVALID_ARGUMENT, "JSON object");
  EXPECT(sfr_dataset_new("{\"0\": \"bg\"}", &ds), SFR_ERR_INVALID_ARGUMENT, "at least one foreground");
  EXPECT(sfr_dataset_new("{\"0\": \"bg\", \"2\": \"x\"}", &ds), SFR_ERR_INVALID_ARGUMENT, "1 is missing");
  EXPECT(sfr_dataset_new("{\"0\": \"bg\", \"one\": \"x\"}", &ds), SFR_ERR_INVALID_ARGUMENT, "\"one\"");
  EXPECT(sfr_dataset_new("{\"0\": \"bg\", \"1\": 3}", &ds), SFR_ERR_INVALID_ARGUMENT, "must be a string");
  EXPECT(sfr_dataset_new(NULL, &ds), SFR_ERR_NULL_POINTER, "classes_json is NULL");
  EXPECT(sfr_dataset_new("{\"0\": \"bg\", \"1\": \"ball\"}", NULL), SFR_ERR_NULL_POINTER, "out is NULL");
  CHECK(ds == NULL); /* outputs only on success */
  OK(sfr_dataset_new("{\"0\": \"background\", \"1\": \"ball\"}", &ds));
  CHECK(ds != NULL);

  for (int c = 0; c < 4; c++) make_case(11u + 7u * (unsigned)c, g_img[c], g_lab[c]);
  sfr_volume_view im = view(g_img[0], sizeof g_img[0], SFR_DTYPE_F32, NX, NY, NZ);
  sfr_volume_view lb = view(g_lab[0], sizeof g_lab[0], SFR_DTYPE_U8, NX, NY, NZ);

  sfr_volume_view bad = view(g_lab[0], NX * NY * (NZ - 1), SFR_DTYPE_U8, NX, NY, NZ - 1);
  EXPECT(sfr_dataset_add_labeled(ds, "a", &im, &bad), SFR_ERR_INVALID_ARGUMENT, "label dims");
  bad = lb;
  bad.origin[2] = 5.0;
  EXPECT(sfr_dataset_add_labeled(ds, "a", &im, &bad), SFR_ERR_INVALID_ARGUMENT, "geometry");
  static uint8_t wrong[NVOX];
  memcpy(wrong, g_lab[0], NVOX);
  wrong[5] = 7;
  bad = view(wrong, NVOX, SFR_DTYPE_U8, NX, NY, NZ);
  EXPECT(sfr_dataset_add_labeled(ds, "a", &im, &bad), SFR_ERR_INVALID_ARGUMENT, "label value 7");
  static float fl[NVOX];
  for (int n = 0; n < NVOX; n++) fl[n] = g_lab[0][n];
  fl[3] = 0.5f;
  bad = view(fl, sizeof fl, SFR_DTYPE_F32, NX, NY, NZ);
  EXPECT(sfr_dataset_add_labeled(ds, "a", &im, &bad), SFR_ERR_INVALID_ARGUMENT, "label value 0.5");
  static float nan_img[NVOX];
  memcpy(nan_img, g_img[0], sizeof nan_img);
  nan_img[100] = NAN;
  sfr_volume_view nimg = view(nan_img, sizeof nan_img, SFR_DTYPE_F32, NX, NY, NZ);
  EXPECT(sfr_dataset_add_labeled(ds, "a", &nimg, &lb), SFR_ERR_INVALID_ARGUMENT, "NaN");
  EXPECT(sfr_dataset_add_labeled(ds, "a", NULL, &lb), SFR_ERR_NULL_POINTER, "image is NULL");
  EXPECT(sfr_dataset_add_labeled(ds, "a", &im, NULL), SFR_ERR_NULL_POINTER, "label is NULL");
  EXPECT(sfr_dataset_add_labeled(ds, "", &im, &lb), SFR_ERR_INVALID_ARGUMENT, "case_id is empty");
  EXPECT(sfr_dataset_add_labeled(NULL, "a", &im, &lb), SFR_ERR_NULL_POINTER, "ds is NULL");
  int not_a_handle = 0;
  EXPECT(sfr_dataset_add_labeled((sfr_dataset *)&not_a_handle, "a", &im, &lb), SFR_ERR_BAD_HANDLE, "not a live sfr_dataset");

  size_t nl = 99, nu = 99;
  OK(sfr_dataset_counts(ds, &nl, &nu));
  CHECK(nl == 0 && nu == 0); /* nothing was added by the failed calls */

  OK(sfr_dataset_add_labeled(ds, "case-a", &im, &lb));
  EXPECT(sfr_dataset_add_labeled(ds, "case-a", &im, &lb), SFR_ERR_INVALID_ARGUMENT, "already in the dataset");
  for (int c = 1; c < 3; c++) {
    /* Labels may come in any integer dtype: here u16. */
    static uint16_t l16[NVOX];
    for (int n = 0; n < NVOX; n++) l16[n] = g_lab[c][n];
    sfr_volume_view i2 = view(g_img[c], sizeof g_img[c], SFR_DTYPE_F32, NX, NY, NZ);
    sfr_volume_view l2 = view(l16, sizeof l16, SFR_DTYPE_U16, NX, NY, NZ);
    OK(sfr_dataset_add_labeled(ds, NULL, &i2, &l2));
  }
  sfr_volume_view iu = view(g_img[3], sizeof g_img[3], SFR_DTYPE_F32, NX, NY, NZ);
  OK(sfr_dataset_add_unlabeled(ds, NULL, &iu));
  EXPECT(sfr_dataset_add_unlabeled(ds, NULL, NULL), SFR_ERR_NULL_POINTER, "image is NULL");
  OK(sfr_dataset_counts(ds, &nl, &nu));
  CHECK(nl == 3 && nu == 1);
  OK(sfr_dataset_counts(ds, NULL, &nu)); /* either output may be NULL */
  return ds;
}

/* ---------------------------------------------------------------- training jobs */
typedef struct {
  pthread_mutex_t lock;
  int calls, finished_seen;
  uint64_t max_retrain_step;
  char stage[32];
} cb_state;

static void on_progress(const sfr_progress *p, void *user) {
  cb_state *s = (cb_state *)user;
  pthread_mutex_lock(&s->lock);
  s->calls++;
  if (p->finished) s->finished_seen = 1;
  if (p->stage[0]) memcpy(s->stage, p->stage, sizeof s->stage);
  if (strcmp(p->stage, "retrain") == 0 && p->step > s->max_retrain_step) s->max_retrain_step = p->step;
  pthread_mutex_unlock(&s->lock);
}

/* A callback that frees its own job (allowed: the job is cancelled, and the callback is called
 * one last time with finished = 1). `job` is set by the starting thread once it has the handle. */
typedef struct {
  pthread_mutex_t lock;
  sfr_job *job;
  int freed, calls_after_free, finished_after_free;
} self_free_state;

static void free_self(const sfr_progress *p, void *user) {
  self_free_state *s = (self_free_state *)user;
  pthread_mutex_lock(&s->lock);
  sfr_job *to_free = NULL;
  if (s->freed) {
    s->calls_after_free++;
    if (p->finished) s->finished_after_free = 1;
  } else if (s->job && !p->finished) {
    s->freed = 1;
    to_free = s->job;
  }
  pthread_mutex_unlock(&s->lock);
  if (to_free) sfr_job_free(to_free);
}

/* A few V-Net iterations with 2 base filters: training for real, in seconds even under
 * valgrind. */
static const char *QUICK = "{\"preset\": \"test-tiny\", \"sfr\": false, \"method\": \"supervised\", "
                           "\"threads\": 1, \"vnet\": {\"iterations\": 3, \"n_filters\": 2}}";

static sfr_model *test_training(sfr_dataset *ds) {
  printf("training jobs\n");
  sfr_job *job = NULL;
  EXPECT(sfr_train_start(ds, "{\"preset\": ", &job), SFR_ERR_INVALID_ARGUMENT, "not JSON");
  EXPECT(sfr_train_start(ds, "{\"preset\": \"test-tiny\", \"bogus\": 1}", &job), SFR_ERR_INVALID_ARGUMENT, "bogus");
  EXPECT(sfr_train_start(ds, "{\"preset\": \"test-tiny\", \"vnet\": {\"iterationz\": 3}}", &job),
         SFR_ERR_INVALID_ARGUMENT, "iterationz");
  EXPECT(sfr_train_start(ds, "{\"preset\": \"no-such-preset\"}", &job), SFR_ERR_INVALID_ARGUMENT, "no-such-preset");
  EXPECT(sfr_train_start(ds, "{\"preset\": \"test-tiny\", \"patch\": [15, 16, 16]}", &job),
         SFR_ERR_INVALID_ARGUMENT, "multiple of 16");
  EXPECT(sfr_train_start(ds, NULL, &job), SFR_ERR_NULL_POINTER, "config_json is NULL");
  EXPECT(sfr_train_start(ds, QUICK, NULL), SFR_ERR_NULL_POINTER, "out is NULL");
  EXPECT(sfr_train_start(NULL, QUICK, &job), SFR_ERR_NULL_POINTER, "ds is NULL");
  sfr_dataset *empty = NULL;
  OK(sfr_dataset_new("{\"0\": \"bg\", \"1\": \"x\"}", &empty));
  EXPECT(sfr_train_start(empty, QUICK, &job), SFR_ERR_INVALID_ARGUMENT, "no labelled case");
  sfr_dataset_free(empty);
  EXPECT(sfr_train_start(empty, QUICK, &job), SFR_ERR_BAD_HANDLE, "not a live sfr_dataset");
  sfr_dataset_free(empty); /* double free: detected, harmless */
  CHECK(job == NULL);

  /* Cancel: twice is fine; wait reports the cancellation; the result is taken once. */
  sfr_job *slow = NULL;
  OK(sfr_train_start(ds, "{\"preset\": \"test-tiny\", \"sfr\": false, \"vnet\": {\"iterations\": 100000}}", &slow));
  OK(sfr_job_cancel(slow));
  OK(sfr_job_cancel(slow));
  sfr_model *none = NULL;
  EXPECT(sfr_job_wait(slow, NULL), SFR_ERR_NULL_POINTER, "out_model is NULL");
  EXPECT(sfr_job_wait(slow, &none), SFR_ERR_CANCELLED, "cancelled");
  CHECK(none == NULL);
  EXPECT(sfr_job_wait(slow, &none), SFR_ERR_STATE, "already taken");
  sfr_progress p;
  OK(sfr_job_poll(slow, &p));
  CHECK(p.finished == 1);
  OK(sfr_job_cancel(slow)); /* after the end: still fine */
  sfr_job_free(slow);
  EXPECT(sfr_job_poll(slow, &p), SFR_ERR_BAD_HANDLE, "not a live sfr_job");
  EXPECT(sfr_job_cancel(slow), SFR_ERR_BAD_HANDLE, "not a live sfr_job");
  sfr_job_free(slow); /* double free */
  sfr_job_free(NULL);

  /* Free a running job without waiting: it is cancelled and joined. */
  sfr_job *dropped = NULL;
  OK(sfr_train_start(ds, "{\"preset\": \"test-tiny\", \"sfr\": false, \"vnet\": {\"iterations\": 100000}}", &dropped));
  sfr_job_free(dropped);

  /* A job freed from its own progress callback. */
  static self_free_state sf;
  memset(&sf, 0, sizeof sf);
  pthread_mutex_init(&sf.lock, NULL);
  sfr_job *self_freed = NULL;
  OK(sfr_train_start_with_callback(ds, "{\"preset\": \"test-tiny\", \"sfr\": false, \"vnet\": {\"iterations\": 100000}}",
                                   free_self, &sf, &self_freed));
  pthread_mutex_lock(&sf.lock);
  sf.job = self_freed;
  pthread_mutex_unlock(&sf.lock);
  int done = 0;
  for (int waited = 0; !done && waited < 300000; waited += 20) {
    sleep_ms(20);
    pthread_mutex_lock(&sf.lock);
    done = sf.finished_after_free;
    pthread_mutex_unlock(&sf.lock);
  }
  printf("  freed from its own callback: %d call(s) after the free, finished seen: %d\n", sf.calls_after_free,
         sf.finished_after_free);
  CHECK(sf.freed && sf.finished_after_free && sf.calls_after_free >= 1);
  EXPECT(sfr_job_poll(self_freed, &p), SFR_ERR_BAD_HANDLE, "not a live sfr_job");
  sleep_ms(500); /* the helper thread joins the job thread; let it end before the mutex goes */
  pthread_mutex_destroy(&sf.lock);

  /* The real run: a progress callback, and polling from this thread. */
  cb_state st;
  memset(&st, 0, sizeof st);
  pthread_mutex_init(&st.lock, NULL);
  OK(sfr_train_start_with_callback(ds, QUICK, on_progress, &st, &job));
  EXPECT(sfr_job_poll(job, NULL), SFR_ERR_NULL_POINTER, "out is NULL");
  EXPECT(sfr_job_poll(NULL, &p), SFR_ERR_NULL_POINTER, "job is NULL");
  EXPECT(sfr_job_poll((sfr_job *)ds, &p), SFR_ERR_BAD_HANDLE, "is an sfr_dataset, not an sfr_job");
  int polls = 0;
  do {
    OK(sfr_job_poll(job, &p));
    CHECK(memchr(p.stage, 0, sizeof p.stage) != NULL && memchr(p.message, 0, sizeof p.message) != NULL);
    if (polls++ % 50 == 0)
      printf("  poll: stage=%s step=%llu/%llu loss=%.4f eta=%.1fs %s\n", p.stage, (unsigned long long)p.step,
             (unsigned long long)p.total, p.loss, p.eta_seconds, p.message);
    sleep_ms(20);
  } while (!p.finished);
  sfr_model *model = NULL;
  EXPECT(sfr_job_wait_segmentation(job, SFR_DTYPE_U8, msg, sizeof msg, NULL, 0), SFR_ERR_STATE, "training job");
  OK(sfr_job_wait(job, &model));
  CHECK(model != NULL);
  sfr_model *again = NULL;
  EXPECT(sfr_job_wait(job, &again), SFR_ERR_STATE, "already taken");
  CHECK(again == NULL);
  sfr_job_free(job);
  pthread_mutex_lock(&st.lock);
  printf("  callback: %d calls, last stage %s, max retrain step %llu\n", st.calls, st.stage,
         (unsigned long long)st.max_retrain_step);
  /* All 3 re-training iterations reported; with 3 labelled cases (8 or fewer) nothing is held
   * out, so the last stage is the fit on the training cases. */
  CHECK(st.calls > 3 && st.finished_seen && st.max_retrain_step == 3 && strcmp(st.stage, "fit") == 0);
  pthread_mutex_unlock(&st.lock);
  pthread_mutex_destroy(&st.lock);
  return model;
}

/* ---------------------------------------------------------------- models and segmentation */
typedef struct {
  const sfr_model *model;
  const sfr_volume_view *image;
  uint8_t labels[NVOX];
  sfr_status status;
} seg_task;

static void *segment_thread(void *arg) {
  seg_task *t = (seg_task *)arg;
  t->status = sfr_segment(t->model, t->image, SFR_DTYPE_U8, t->labels, NVOX, NULL, 0);
  return NULL;
}

static void test_models(sfr_model *model, sfr_dataset *ds, const char *dir) {
  printf("models and segmentation\n");
  size_t nc = 0;
  OK(sfr_model_num_classes(model, &nc));
  CHECK(nc == 2);
  EXPECT(sfr_model_num_classes(model, NULL), SFR_ERR_NULL_POINTER, "out is NULL");
  EXPECT(sfr_model_num_classes((sfr_model *)ds, &nc), SFR_ERR_BAD_HANDLE, "is an sfr_dataset, not an sfr_model");

  size_t needed = 0;
  EXPECT(sfr_model_metadata_json(model, NULL, 0, &needed), SFR_ERR_BUFFER_TOO_SMALL, "needs");
  CHECK(needed > 100);
  char *meta = malloc(needed);
  memset(meta, 'z', needed);
  EXPECT(sfr_model_metadata_json(model, meta, needed - 1, &needed), SFR_ERR_BUFFER_TOO_SMALL, "needs");
  CHECK(meta[0] == 'z'); /* untouched */
  EXPECT(sfr_model_metadata_json(model, meta, needed, NULL), SFR_ERR_NULL_POINTER, "needed is NULL");
  OK(sfr_model_metadata_json(model, meta, needed, &needed));
  CHECK(strlen(meta) == needed - 1 && strstr(meta, "\"ball\"") && strstr(meta, "\"library_version\":\"" SFR_VERSION "\""));
  /* The device the training really ran on ("auto" here). */
  CHECK(strstr(meta, g_cuda_available == 1 ? "\"device\":\"cuda:0\"" : "\"device\":\"cpu\"") != NULL);
  free(meta);

  char path[512], garbage[512];
  snprintf(path, sizeof path, "%s/m.sfrmodel", dir);
  snprintf(garbage, sizeof garbage, "%s/garbage.sfrmodel", dir);
  OK(sfr_model_save(model, path));
  EXPECT(sfr_model_save(model, "/nonexistent-dir/m.sfrmodel"), SFR_ERR_IO, "/nonexistent-dir/m.sfrmodel");
  EXPECT(sfr_model_save(model, NULL), SFR_ERR_NULL_POINTER, "path is NULL");
  EXPECT(sfr_model_save(model, ""), SFR_ERR_INVALID_ARGUMENT, "path is empty");
  FILE *f = fopen(garbage, "wb");
  fputs("this is not a model", f);
  fclose(f);
  sfr_model *loaded = NULL;
  EXPECT(sfr_model_load(garbage, "cpu", &loaded), SFR_ERR_FORMAT, "garbage.sfrmodel");
  EXPECT(sfr_model_load("/nonexistent-dir/m.sfrmodel", "cpu", &loaded), SFR_ERR_IO, "/nonexistent-dir/m.sfrmodel");
  EXPECT(sfr_model_load(path, "tpu", &loaded), SFR_ERR_INVALID_ARGUMENT, "unknown device 'tpu'");
  EXPECT(sfr_model_load(path, "cpu", NULL), SFR_ERR_NULL_POINTER, "out is NULL");
  if (g_cuda_available == 0)
    EXPECT(sfr_model_load(path, "cuda", &loaded), SFR_ERR_INVALID_ARGUMENT, "no CUDA device is available");
  CHECK(loaded == NULL);
  OK(sfr_model_load(path, "cpu", &loaded));
  sfr_model *loaded_auto = NULL;
  OK(sfr_model_load(path, NULL, &loaded_auto)); /* NULL device = auto */
  unlink(garbage);

  /* Segment a case the model has not seen, as f32 and as i16. */
  static float img[NVOX];
  static uint8_t truth[NVOX];
  make_case(999u, img, truth);
  sfr_volume_view v = view(img, sizeof img, SFR_DTYPE_F32, NX, NY, NZ);
  v.spacing[2] = 2.5; /* not the model's spacing: resampled to it inside, the outputs on this grid */
  static uint8_t l8[NVOX];
  static uint16_t l16[NVOX];
  static float probs[2 * NVOX];
  memset(l8, 0xAB, sizeof l8);
  EXPECT(sfr_segment(model, &v, SFR_DTYPE_U8, l8, NVOX - 1, NULL, 0), SFR_ERR_BUFFER_TOO_SMALL, "needs 4320");
  EXPECT(sfr_segment(model, &v, SFR_DTYPE_U8, l8, NVOX, probs, 2 * NVOX - 1), SFR_ERR_BUFFER_TOO_SMALL, "needs 8640");
  EXPECT(sfr_segment(model, &v, SFR_DTYPE_F32, l8, sizeof l8, NULL, 0), SFR_ERR_INVALID_ARGUMENT, "SFR_DTYPE_U16");
  EXPECT(sfr_segment(model, &v, (sfr_dtype)99, l8, sizeof l8, NULL, 0), SFR_ERR_INVALID_ARGUMENT, "unknown dtype 99");
  EXPECT(sfr_segment(model, &v, SFR_DTYPE_U8, NULL, NVOX, NULL, 0), SFR_ERR_NULL_POINTER, "labels is NULL");
  EXPECT(sfr_segment(model, NULL, SFR_DTYPE_U8, l8, NVOX, NULL, 0), SFR_ERR_NULL_POINTER, "image is NULL");
  EXPECT(sfr_segment(NULL, &v, SFR_DTYPE_U8, l8, NVOX, NULL, 0), SFR_ERR_NULL_POINTER, "model is NULL");
  CHECK(l8[0] == 0xAB && l8[NVOX - 1] == 0xAB); /* untouched by every failure */
  OK(sfr_segment(model, &v, SFR_DTYPE_U8, l8, NVOX, probs, 2 * NVOX));
  OK(sfr_segment(model, &v, SFR_DTYPE_U16, l16, sizeof l16, NULL, 0));
  int labels_ok = 1, probs_ok = 1, same16 = 1;
  size_t fg = 0, inter = 0, truth_fg = 0;
  for (size_t n = 0; n < NVOX; n++) {
    float p0 = probs[n], p1 = probs[NVOX + n];
    labels_ok &= l8[n] <= 1;
    probs_ok &= fabsf(p0 + p1 - 1.0f) < 1e-4f && (l8[n] == (p1 > p0) || fabsf(p1 - p0) < 1e-6f);
    same16 &= l16[n] == l8[n];
    fg += l8[n];
    truth_fg += truth[n];
    inter += l8[n] && truth[n];
  }
  CHECK(labels_ok && probs_ok && same16);
  printf("  3-iteration model: %zu foreground voxels (truth %zu, overlap %zu)\n", fg, truth_fg, inter);

  /* Integer input, loaded model: the same labels as the original model on the same image. */
  static int16_t i16[NVOX];
  for (size_t n = 0; n < NVOX; n++) i16[n] = (int16_t)lrintf(img[n] * 100.0f);
  sfr_volume_view vi = view(i16, sizeof i16, SFR_DTYPE_I16, NX, NY, NZ);
  static uint8_t a[NVOX], b[NVOX];
  OK(sfr_segment(model, &vi, SFR_DTYPE_U8, a, NVOX, NULL, 0));
  OK(sfr_segment(loaded, &vi, SFR_DTYPE_U8, b, NVOX, NULL, 0));
  CHECK(memcmp(a, b, NVOX) == 0);

  /* One model, two threads at once: both succeed with the single-threaded result. */
  static seg_task t1, t2;
  t1.model = t2.model = loaded;
  t1.image = t2.image = &v;
  pthread_t th1, th2;
  CHECK(pthread_create(&th1, NULL, segment_thread, &t1) == 0);
  CHECK(pthread_create(&th2, NULL, segment_thread, &t2) == 0);
  pthread_join(th1, NULL);
  pthread_join(th2, NULL);
  CHECK(t1.status == SFR_OK && t2.status == SFR_OK);
  CHECK(memcmp(t1.labels, l8, NVOX) == 0 && memcmp(t2.labels, l8, NVOX) == 0);

  /* Segmentation as a job; the model handle is freed while the job runs (the job keeps it). */
  sfr_job *job = NULL;
  EXPECT(sfr_segment_start(loaded, NULL, &job), SFR_ERR_NULL_POINTER, "image is NULL");
  EXPECT(sfr_segment_start(loaded, &v, NULL), SFR_ERR_NULL_POINTER, "out is NULL");
  OK(sfr_segment_start(loaded, &v, &job));
  sfr_model_free(loaded);
  EXPECT(sfr_model_num_classes(loaded, &nc), SFR_ERR_BAD_HANDLE, "not a live sfr_model");
  sfr_model_free(loaded); /* double free */
  sfr_progress p;
  do {
    OK(sfr_job_poll(job, &p));
    sleep_ms(10);
  } while (!p.finished);
  CHECK(strcmp(p.stage, "segment") == 0 && p.step == p.total && p.total > 0);
  sfr_model *m = NULL;
  EXPECT(sfr_job_wait(job, &m), SFR_ERR_STATE, "segmentation job");
  static uint8_t js[NVOX];
  static float jp[2 * NVOX];
  memset(js, 0xCD, sizeof js);
  EXPECT(sfr_job_wait_segmentation(job, SFR_DTYPE_U16, js, NVOX, NULL, 0), SFR_ERR_BUFFER_TOO_SMALL, "needs 8640");
  EXPECT(sfr_job_wait_segmentation(job, SFR_DTYPE_U8, js, NVOX, jp, 10), SFR_ERR_BUFFER_TOO_SMALL, "needs 8640");
  EXPECT(sfr_job_wait_segmentation(job, SFR_DTYPE_I8, js, NVOX, NULL, 0), SFR_ERR_INVALID_ARGUMENT, "i8");
  CHECK(js[0] == 0xCD);
  OK(sfr_job_wait_segmentation(job, SFR_DTYPE_U8, js, NVOX, jp, 2 * NVOX)); /* the result was kept */
  int jp_ok = 1;
  for (size_t n = 0; n < 2 * NVOX; n++) jp_ok &= fabsf(jp[n] - probs[n]) < 1e-5f;
  CHECK(memcmp(js, l8, NVOX) == 0 && jp_ok);
  EXPECT(sfr_job_wait_segmentation(job, SFR_DTYPE_U8, js, NVOX, NULL, 0), SFR_ERR_STATE, "already taken");
  sfr_job_free(job);
  sfr_job_free(job);

  /* A segmentation job cancelled at once. */
  OK(sfr_segment_start(loaded_auto, &v, &job));
  OK(sfr_job_cancel(job));
  OK(sfr_job_cancel(job));
  sfr_status s = sfr_job_wait_segmentation(job, SFR_DTYPE_U8, js, NVOX, NULL, 0);
  /* It may have finished before the cancel arrived; either outcome is a clean status. */
  CHECK(s == SFR_ERR_CANCELLED || s == SFR_OK);
  sfr_job_free(job);

  sfr_model_free(loaded_auto);
  sfr_model_free(NULL);
  unlink(path);
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  printf("libsfr %s, header %s\n", sfr_version(), SFR_VERSION);
  char dir[] = "/tmp/sfr_c_test_XXXXXX";
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 2;
  }
  test_version_and_errors();
  test_device_info();
  test_views();
  test_stitch();
  sfr_dataset *ds = test_dataset();
  sfr_model *model = test_training(ds);
  if (model) {
    test_models(model, ds, dir);
    sfr_model_free(model);
  }
  sfr_dataset_free(ds);
  sfr_dataset_free(ds);
  EXPECT(sfr_dataset_counts(ds, NULL, NULL), SFR_ERR_BAD_HANDLE, "not a live sfr_dataset");
  rmdir(dir);
  printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
