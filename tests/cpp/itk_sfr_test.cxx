// An ITK program using the installed SFR package as an imaging developer would:
//  1. trains a tiny model from labelled (and one unlabelled) synthetic ITK images through the
//     job API, printing progress from polls (and counting callback calls);
//  2. for an axis-aligned isotropic volume and an oblique, anisotropic one: writes it as NIfTI,
//     reads it back with itk::ImageFileReader, segments the reader's buffer (no copy), writes
//     the labels with itk::ImageFileWriter, reads them back and checks that origin, spacing and
//     direction equal the input's, and that the voxels are those written;
//  3. segments one volume as a job and checks it equals the synchronous result;
//  4. segments a piece of an oblique image as ExtractImageFilter gives it (buffered region
//     starting at a non-zero index, GetOrigin() still the full image's): the view must carry
//     the physical position of the piece's first voxel, and the labels written by ITK from
//     that piece must land where the library saw it.
// Usage: sfr_itk_test OUTPUT_DIR. Exit status 0 when every check passed.
#include <sfr.h>

#include <itkExtractImageFilter.h>
#include <itkImage.h>
#include <itkImageFileReader.h>
#include <itkImageFileWriter.h>
#include <itkVersion.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <sys/stat.h>
#include <thread>
#include <vector>

using Image = itk::Image<float, 3>;
using Labels = itk::Image<unsigned char, 3>;

namespace {

int failures = 0;

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      failures++;                                                                \
    }                                                                            \
  } while (0)

// Any failing call ends the program with the library's message.
void ok(sfr_status s, const char *what) {
  if (s != SFR_OK) {
    std::vector<char> msg(sfr_last_error_message(nullptr, 0));
    sfr_last_error_message(msg.data(), msg.size());
    throw std::runtime_error(std::string(what) + " failed (status " + std::to_string(s) + "): " + msg.data());
  }
}

template <typename T> sfr_dtype dtype_of();
template <> sfr_dtype dtype_of<float>() { return SFR_DTYPE_F32; }
template <> sfr_dtype dtype_of<unsigned char>() { return SFR_DTYPE_U8; }

// The view of an ITK image's buffer: the BUFFERED region (which may be only part of the
// image, e.g. after ExtractImageFilter or in a streamed pipeline), with the physical position
// of that region's first voxel as origin. GetOrigin() is the position of index 0, which is
// not in the buffer when the region starts elsewhere. The library reads the buffer during
// the call only (it converts what it keeps into its own copy).
template <typename T> sfr_volume_view view_of(const itk::Image<T, 3> *img) {
  sfr_volume_view v;
  std::memset(&v, 0, sizeof v);
  const auto region = img->GetBufferedRegion();
  const auto size = region.GetSize();
  typename itk::Image<T, 3>::PointType first;
  img->TransformIndexToPhysicalPoint(region.GetIndex(), first);
  v.data = img->GetBufferPointer();
  v.data_len = region.GetNumberOfPixels() * sizeof(T);
  v.dtype = dtype_of<T>();
  for (unsigned a = 0; a < 3; a++) {
    v.dims[a] = size[a];
    v.spacing[a] = img->GetSpacing()[a];
    v.origin[a] = first[a];
    for (unsigned c = 0; c < 3; c++) v.direction[3 * a + c] = img->GetDirection()(a, c);
  }
  return v;
}

struct Geometry {
  Image::SizeType size;
  Image::SpacingType spacing;
  Image::PointType origin;
  Image::DirectionType direction;
};

// A bright ball (label 1) at a random place on a noisy background, in index space, so the
// same kind of image whatever the geometry.
Image::Pointer make_case(const Geometry &g, unsigned seed, Labels::Pointer *truth) {
  Image::RegionType region;
  region.SetSize(g.size);
  auto img = Image::New();
  img->SetRegions(region);
  img->SetSpacing(g.spacing);
  img->SetOrigin(g.origin);
  img->SetDirection(g.direction);
  img->Allocate();
  auto lab = Labels::New();
  lab->CopyInformation(img);
  lab->SetRegions(region);
  lab->Allocate();
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::normal_distribution<double> noise(0.0, 6.0);
  double c[3], r = 4.0 + 2.0 * u(rng);
  for (unsigned a = 0; a < 3; a++) c[a] = g.size[a] * (0.35 + 0.3 * u(rng));
  float *p = img->GetBufferPointer();
  unsigned char *l = lab->GetBufferPointer();
  size_t n = 0;
  for (size_t k = 0; k < g.size[2]; k++)
    for (size_t j = 0; j < g.size[1]; j++)
      for (size_t i = 0; i < g.size[0]; i++, n++) {
        double d = std::sqrt((i - c[0]) * (i - c[0]) + (j - c[1]) * (j - c[1]) + (k - c[2]) * (k - c[2]));
        l[n] = d <= r;
        p[n] = static_cast<float>((l[n] ? 100.0 : 30.0) + noise(rng));
      }
  if (truth) *truth = lab;
  return img;
}

Geometry geometry(unsigned nx, unsigned ny, unsigned nz, const double sp[3], const double org[3], double yaw, double pitch) {
  Geometry g;
  g.size[0] = nx;
  g.size[1] = ny;
  g.size[2] = nz;
  for (unsigned a = 0; a < 3; a++) {
    g.spacing[a] = sp[a];
    g.origin[a] = org[a];
  }
  // Rotation about z by yaw, then about x by pitch: columns are the axis directions.
  const double cy = std::cos(yaw), sy = std::sin(yaw), cp = std::cos(pitch), spi = std::sin(pitch);
  const double Rz[3][3] = {{cy, -sy, 0}, {sy, cy, 0}, {0, 0, 1}};
  const double Rx[3][3] = {{1, 0, 0}, {0, cp, -spi}, {0, spi, cp}};
  for (unsigned r = 0; r < 3; r++)
    for (unsigned c = 0; c < 3; c++) {
      double s = 0;
      for (unsigned m = 0; m < 3; m++) s += Rx[r][m] * Rz[m][c];
      g.direction(r, c) = s;
    }
  return g;
}

template <typename A, typename B> double geometry_diff(const A *a, const B *b) {
  double d = 0;
  for (unsigned r = 0; r < 3; r++) {
    d = std::max(d, std::fabs(a->GetOrigin()[r] - b->GetOrigin()[r]));
    d = std::max(d, std::fabs(a->GetSpacing()[r] - b->GetSpacing()[r]));
    for (unsigned c = 0; c < 3; c++) d = std::max(d, std::fabs(a->GetDirection()(r, c) - b->GetDirection()(r, c)));
  }
  return d;
}

template <typename T> typename itk::Image<T, 3>::Pointer read(const std::string &path) {
  auto reader = itk::ImageFileReader<itk::Image<T, 3>>::New();
  reader->SetFileName(path);
  reader->Update();
  return reader->GetOutput();
}

template <typename T> void write(const itk::Image<T, 3> *img, const std::string &path) {
  auto writer = itk::ImageFileWriter<itk::Image<T, 3>>::New();
  writer->SetFileName(path);
  writer->SetInput(img);
  writer->Update();
}

double dice(const Labels *a, const Labels *b) {
  const size_t n = a->GetBufferedRegion().GetNumberOfPixels();
  size_t inter = 0, sa = 0, sb = 0;
  for (size_t i = 0; i < n; i++) {
    const bool x = a->GetBufferPointer()[i] == 1, y = b->GetBufferPointer()[i] == 1;
    inter += x && y;
    sa += x;
    sb += y;
  }
  return sa + sb == 0 ? 1.0 : 2.0 * inter / double(sa + sb);
}

struct CallbackCount {
  std::mutex m;
  int calls = 0;
  bool finished = false;
};

void on_progress(const sfr_progress *p, void *user) {
  auto *c = static_cast<CallbackCount *>(user);
  std::lock_guard<std::mutex> g(c->m);
  c->calls++;
  c->finished = c->finished || p->finished;
}

sfr_model *train() {
  const double sp[3] = {1, 1, 1}, org[3] = {0, 0, 0};
  const Geometry g = geometry(24, 24, 16, sp, org, 0, 0);
  sfr_dataset *ds = nullptr;
  ok(sfr_dataset_new(R"({"0": "background", "1": "ball"})", &ds), "sfr_dataset_new");
  for (unsigned c = 0; c < 5; c++) {
    Labels::Pointer truth;
    auto img = make_case(g, 100 + c, &truth);
    const sfr_volume_view vi = view_of<float>(img);
    const sfr_volume_view vl = view_of<unsigned char>(truth);
    const std::string id = "ball" + std::to_string(c);
    // The buffers belong to ITK and are freed when the images go out of scope: the dataset
    // holds copies.
    if (c < 4) ok(sfr_dataset_add_labeled(ds, id.c_str(), &vi, &vl), "sfr_dataset_add_labeled");
    else ok(sfr_dataset_add_unlabeled(ds, id.c_str(), &vi), "sfr_dataset_add_unlabeled");
  }
  // SFR end to end on a CPU in seconds: tiny SAM on a 128 canvas (pseudo-labels for the
  // unlabelled case), then the V-Net; one labelled case held out for validation.
  const char *config = R"({"preset": "test-tiny", "validation_cases": 1, "vnet": {"iterations": 60}})";
  CallbackCount cb;
  sfr_job *job = nullptr;
  ok(sfr_train_start_with_callback(ds, config, on_progress, &cb, &job), "sfr_train_start_with_callback");
  sfr_dataset_free(ds);  // the job trains on its own copy
  sfr_progress p;
  std::string last;
  const auto t0 = std::chrono::steady_clock::now();
  do {
    ok(sfr_job_poll(job, &p), "sfr_job_poll");
    char line[512];
    std::snprintf(line, sizeof line, "  [%-11s] %4llu/%-4llu loss %-8.4f eta %5.1f s  %s", p.stage,
                  (unsigned long long)p.step, (unsigned long long)p.total, p.loss, p.eta_seconds, p.message);
    // One line per stage change or every 10 steps, so the log shows progress without flooding.
    if (last.compare(0, 15, line, 15) != 0 || p.step % 10 == 0 || p.finished) {
      if (last != line) std::puts(line);
      last = line;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  } while (!p.finished);
  sfr_model *model = nullptr;
  ok(sfr_job_wait(job, &model), "sfr_job_wait");
  sfr_job_free(job);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  {
    std::lock_guard<std::mutex> lock(cb.m);
    std::printf("trained in %.1f s; progress callback called %d times\n", secs, cb.calls);
    CHECK(cb.calls > 10 && cb.finished);
  }
  size_t needed = 0;
  sfr_model_metadata_json(model, nullptr, 0, &needed);
  std::vector<char> meta(needed);
  ok(sfr_model_metadata_json(model, meta.data(), meta.size(), &needed), "sfr_model_metadata_json");
  const char *val = std::strstr(meta.data(), "\"mean_dice\":");
  std::printf("validation: %.40s\n", val ? val : "(none)");
  CHECK(val != nullptr);
  CHECK(std::strstr(meta.data(), "\"unlabeled_cases\":1") != nullptr);
  return model;
}

// Write -> read -> segment -> write -> read, checking the geometry at every step.
void round_trip(sfr_model *model, const Geometry &g, unsigned seed, const std::string &dir, const std::string &name, bool as_job) {
  std::printf("%s: size %lu x %lu x %lu, spacing (%.2f, %.2f, %.2f)\n", name.c_str(), (unsigned long)g.size[0],
              (unsigned long)g.size[1], (unsigned long)g.size[2], g.spacing[0], g.spacing[1], g.spacing[2]);
  Labels::Pointer truth;
  auto made = make_case(g, seed, &truth);
  const std::string in_path = dir + "/" + name + ".nii.gz", out_path = dir + "/" + name + "_seg.nii.gz";
  write<float>(made, in_path);
  auto input = read<float>(in_path);
  // NIfTI stores the geometry in float32: equal to ~1e-6 relative.
  const double d_in = geometry_diff(made.GetPointer(), input.GetPointer());
  std::printf("  NIfTI round trip of the input: max geometry difference %.2e\n", d_in);
  CHECK(d_in < 1e-4);
  CHECK(input->GetLargestPossibleRegion().GetSize() == g.size);

  auto seg = Labels::New();
  seg->CopyInformation(input);  // the labels have exactly the input's geometry
  seg->SetRegions(input->GetLargestPossibleRegion());
  seg->Allocate();
  const size_t n = input->GetLargestPossibleRegion().GetNumberOfPixels();
  std::vector<float> probs(2 * n);
  const sfr_volume_view v = view_of<float>(input);
  ok(sfr_segment(model, &v, SFR_DTYPE_U8, seg->GetBufferPointer(), n, probs.data(), probs.size()), "sfr_segment");
  if (as_job) {
    sfr_job *job = nullptr;
    ok(sfr_segment_start(model, &v, &job), "sfr_segment_start");
    std::vector<unsigned short> l16(n);
    ok(sfr_job_wait_segmentation(job, SFR_DTYPE_U16, l16.data(), l16.size() * 2, nullptr, 0), "sfr_job_wait_segmentation");
    sfr_job_free(job);
    size_t differ = 0;
    for (size_t i = 0; i < n; i++) differ += l16[i] != seg->GetBufferPointer()[i];
    std::printf("  segmentation job: %zu voxels differ from sfr_segment\n", differ);
    CHECK(differ == 0);
  }
  size_t fg = 0, bad = 0;
  for (size_t i = 0; i < n; i++) {
    const unsigned char l = seg->GetBufferPointer()[i];
    fg += l == 1;
    bad += l > 1 || std::fabs(probs[i] + probs[n + i] - 1.0f) > 1e-4f;
  }
  CHECK(bad == 0);
  const double dc = dice(seg, truth);
  std::printf("  %zu foreground voxels, Dice vs truth %.3f\n", fg, dc);
  CHECK(dc > 0.5);

  write<unsigned char>(seg, out_path);
  auto back = read<unsigned char>(out_path);
  const double d_out = geometry_diff(input.GetPointer(), back.GetPointer());
  std::printf("  labels written and read back: max geometry difference to the input %.2e\n", d_out);
  CHECK(d_out < 1e-5);
  CHECK(back->GetLargestPossibleRegion().GetSize() == g.size);
  CHECK(std::memcmp(back->GetBufferPointer(), seg->GetBufferPointer(), n) == 0);
}

template <typename T> typename itk::Image<T, 3>::Pointer extract(const itk::Image<T, 3> *img, const Image::RegionType &r) {
  auto f = itk::ExtractImageFilter<itk::Image<T, 3>, itk::Image<T, 3>>::New();
  f->SetInput(img);
  f->SetExtractionRegion(r);
  f->SetDirectionCollapseToSubmatrix();
  f->Update();
  return f->GetOutput();
}

// Step 4: a buffer that is only part of its image.
void extracted_piece(sfr_model *model, const Geometry &g, unsigned seed, const std::string &dir) {
  Labels::Pointer truth;
  auto full = make_case(g, seed, &truth);
  Image::RegionType piece;
  Image::IndexType start;
  Image::SizeType size;
  const long offset[3] = {3, 2, 2};
  for (unsigned a = 0; a < 3; a++) {
    start[a] = offset[a];
    size[a] = g.size[a] - offset[a] - 1;
  }
  piece.SetIndex(start);
  piece.SetSize(size);
  auto part = extract<float>(full, piece);
  auto truth_part = extract<unsigned char>(truth, piece);
  CHECK(part->GetBufferedRegion().GetIndex() == start);

  const sfr_volume_view v = view_of<float>(part);
  Image::PointType first;
  full->TransformIndexToPhysicalPoint(start, first);
  double to_first = 0, to_origin = 0;
  for (unsigned a = 0; a < 3; a++) {
    CHECK(v.dims[a] == size[a]);
    to_first = std::max(to_first, std::fabs(v.origin[a] - first[a]));
    to_origin = std::max(to_origin, std::fabs(v.origin[a] - part->GetOrigin()[a]));
  }
  std::printf("extracted piece at index (%ld, %ld, %ld), size %lu x %lu x %lu: view origin is the first "
              "voxel's (diff %.1e), %.2f mm from GetOrigin()\n", start[0], start[1], start[2], (unsigned long)size[0],
              (unsigned long)size[1], (unsigned long)size[2], to_first, to_origin);
  CHECK(to_first < 1e-9);
  CHECK(to_origin > 1.0);  // so using GetOrigin() would have been wrong here

  auto seg = Labels::New();
  seg->CopyInformation(part);
  seg->SetRegions(part->GetBufferedRegion());
  seg->Allocate();
  const size_t n = part->GetBufferedRegion().GetNumberOfPixels();
  ok(sfr_segment(model, &v, SFR_DTYPE_U8, seg->GetBufferPointer(), n, nullptr, 0), "sfr_segment (piece)");
  const double dc = dice(seg, truth_part);
  std::printf("  piece: Dice vs truth %.3f\n", dc);
  CHECK(dc > 0.5);
  // ITK writes the piece with the position of its first voxel as the file's origin: it must be
  // the origin the library was given.
  const std::string out_path = dir + "/piece_seg.nii.gz";
  write<unsigned char>(seg, out_path);
  auto back = read<unsigned char>(out_path);
  double d = 0;
  for (unsigned a = 0; a < 3; a++) d = std::max(d, std::fabs(back->GetOrigin()[a] - v.origin[a]));
  std::printf("  piece labels written by ITK: origin differs from the view's by %.2e mm\n", d);
  CHECK(d < 1e-4);
  CHECK(back->GetLargestPossibleRegion().GetSize() == size);
}

}  // namespace

int main(int argc, char **argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUTPUT_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  mkdir(dir.c_str(), 0755);
  std::printf("libsfr %s (header %s), ITK %s\n", sfr_version(), SFR_VERSION, itk::Version::GetITKVersion());
  try {
    sfr_model *model = train();
    const double iso[3] = {1, 1, 1}, zero[3] = {0, 0, 0};
    round_trip(model, geometry(26, 22, 18, iso, zero, 0, 0), 7, dir, "axis_aligned", true);
    // Oblique (rotated 30 deg about z, then 20 deg about x) and anisotropic.
    const double aniso[3] = {0.7, 0.9, 2.5}, org[3] = {-12.5, 30.25, 7.0};
    round_trip(model, geometry(28, 24, 14, aniso, org, 0.5236, 0.3491), 8, dir, "oblique", false);
    extracted_piece(model, geometry(28, 24, 14, aniso, org, 0.5236, 0.3491), 9, dir);
    sfr_model_free(model);
  } catch (const std::exception &e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  std::printf("%s\n", failures == 0 ? "all checks passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
