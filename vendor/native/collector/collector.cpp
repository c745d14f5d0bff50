// tbpw-collector: activation statistics of every weight matrix, on stock llama.cpp.
//
// Runs a model over calibration text the way stock llama-imatrix does (same chunks, batches and
// context parameters, so the same matrix multiplications see the same inputs) and records, per
// input column of every weight, the sum of squares (in_sum2), the sum (in_sum) and the number of
// rows (counts), per expert for mixture-of-experts weights. Stock llama-imatrix records only the
// first and the last; tbpw's error metric also needs the mean activation E[a] = in_sum / counts.
//
// Written against the public headers llama.h, ggml.h, ggml-backend.h and gguf.h only.

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "gguf.h"
#include "llama.h"

#include <algorithm>
#include <chrono>
#include <clocale>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// command line

struct Options {
    std::string model;
    std::string text_file;
    std::string out = "imatrix.gguf";
    int ctx = 512;
    int batch = 2048;   // llama-imatrix's default logical batch: it decides how many chunks run side by side
    int ubatch = 512;
    int chunks = -1;
    int threads = -1;
    int gpu_layers = -1;  // llama.cpp's default: offload what fits
    std::string flash_attn = "auto";
    bool process_output = false;
    bool parse_special = false;
    bool verbose = false;
};

[[noreturn]] void fail(const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::fprintf(stderr, "error: ");
    std::vfprintf(stderr, fmt, args);
    std::fprintf(stderr, "\n");
    va_end(args);
    std::exit(1);
}

void usage(const char * argv0) {
    std::printf(
        "usage: %s -m MODEL.gguf -f TEXT.txt [-o OUT.gguf] [options]\n"
        "\n"
        "Writes a GGUF imatrix with <weight>.in_sum2, <weight>.counts and <weight>.in_sum.\n"
        "Options mirror llama-imatrix, so the same arguments give the same chunks:\n"
        "  -c, --ctx-size N         tokens per chunk (default 512)\n"
        "  -b, --batch-size N       logical batch (default 2048; chunks per pass = N / ctx)\n"
        "  -ub, --ubatch-size N     physical batch (default 512)\n"
        "  --chunks N               stop after N chunks (default: all)\n"
        "  -t, --threads N          CPU threads (default: all)\n"
        "  -ngl, --n-gpu-layers N   layers to offload to a GPU (default: llama.cpp's choice)\n"
        "  -fa, --flash-attn on|off|auto\n"
        "  --process-output         also collect output.weight\n"
        "  --parse-special          tokenize special tokens in the text\n"
        "  -v, --verbose            pass llama.cpp's informational log through\n",
        argv0);
}

int parse_int(const std::string & flag, const char * value) {
    char * end = nullptr;
    const long v = std::strtol(value, &end, 10);
    if (end == value || *end != '\0') {
        fail("%s needs an integer, got '%s'", flag.c_str(), value);
    }
    return (int) v;
}

Options parse_args(int argc, char ** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> const char * {
            if (i + 1 >= argc) {
                fail("%s needs a value", a.c_str());
            }
            return argv[++i];
        };
        if (a == "-h" || a == "--help") {
            usage(argv[0]);
            std::exit(0);
        } else if (a == "-m" || a == "--model") {
            o.model = value();
        } else if (a == "-f" || a == "--file") {
            o.text_file = value();
        } else if (a == "-o" || a == "--output" || a == "--output-file") {
            o.out = value();
        } else if (a == "-c" || a == "--ctx-size") {
            o.ctx = parse_int(a, value());
        } else if (a == "-b" || a == "--batch-size") {
            o.batch = parse_int(a, value());
        } else if (a == "-ub" || a == "--ubatch-size") {
            o.ubatch = parse_int(a, value());
        } else if (a == "--chunks") {
            o.chunks = parse_int(a, value());
        } else if (a == "-t" || a == "--threads") {
            o.threads = parse_int(a, value());
        } else if (a == "-ngl" || a == "--n-gpu-layers" || a == "--gpu-layers") {
            o.gpu_layers = parse_int(a, value());
        } else if (a == "-fa" || a == "--flash-attn") {
            o.flash_attn = value();
            if (o.flash_attn != "on" && o.flash_attn != "off" && o.flash_attn != "auto") {
                fail("%s takes on, off or auto, got '%s'", a.c_str(), o.flash_attn.c_str());
            }
        } else if (a == "--process-output") {
            o.process_output = true;
        } else if (a == "--parse-special") {
            o.parse_special = true;
        } else if (a == "-v" || a == "--verbose") {
            o.verbose = true;
        } else {
            fail("unknown argument '%s' (see --help)", a.c_str());
        }
    }
    if (o.model.empty() || o.text_file.empty()) {
        usage(argv[0]);
        fail("-m MODEL and -f TEXT are required");
    }
    if (o.ctx <= 0 || o.batch <= 0 || o.ubatch <= 0) {
        fail("--ctx-size, --batch-size and --ubatch-size must be positive");
    }
    if (o.threads <= 0) {
        o.threads = (int) std::max(1u, std::thread::hardware_concurrency());
    }
    return o;
}

// llama.cpp logs a lot at INFO level; by default only its warnings and errors get through.
struct LogFilter {
    bool verbose = false;
    bool passing = true;  // whether the last non-continuation line was shown
};

void log_filter(enum ggml_log_level level, const char * text, void * user_data) {
    auto * f = static_cast<LogFilter *>(user_data);
    if (level != GGML_LOG_LEVEL_CONT) {
        f->passing = f->verbose || level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR;
    }
    if (f->passing) {
        std::fputs(text, stderr);
    }
}

// ---------------------------------------------------------------------------------------------
// statistics

struct Stats {
    std::vector<float> sum2;      // n_mat rows of ne0 values, accumulated in float like llama-imatrix
    std::vector<float> sum;
    std::vector<int64_t> counts;  // one per matrix (expert); one for a dense weight
};

class Collector {
public:
    explicit Collector(bool process_output) : process_output_(process_output) {}

    // The scheduler asks first (ask = true) whether a node's result is wanted, then hands it over.
    static bool callback(struct ggml_tensor * t, bool ask, void * user_data) {
        auto * self = static_cast<Collector *>(user_data);
        return ask ? self->wants(t) : self->take(t);
    }

    const std::map<std::string, Stats> & stats() const { return stats_; }

private:
    bool process_output_;
    std::map<std::string, Stats> stats_;
    std::vector<char> src1_copy_;
    std::vector<char> ids_copy_;

    // A weight copied to another backend is named like "CUDA0#blk.0.attn_q.weight#0".
    static std::string weight_name(const char * name) {
        const char * p = std::strchr(name, '#');
        if (p == nullptr) {
            return name;
        }
        ++p;
        const char * q = std::strchr(p, '#');
        return q ? std::string(p, q - p) : std::string(p);
    }

    // The same selection as llama-imatrix: every routed multiplication, and dense multiplications of
    // block weights with at least 16 F32 input rows (so single-token steps never count).
    bool wants(const struct ggml_tensor * t) const {
        if (t->op == GGML_OP_MUL_MAT_ID) {
            return true;
        }
        if (t->op != GGML_OP_MUL_MAT) {
            return false;
        }
        const struct ggml_tensor * src1 = t->src[1];
        if (src1->ne[1] < 16 || src1->type != GGML_TYPE_F32) {
            return false;
        }
        const std::string name = weight_name(t->src[0]->name);
        return name.rfind("blk.", 0) == 0 || (process_output_ && name == "output.weight");
    }

    // Host pointer to a tensor's bytes, copying from device memory when the backend is a GPU.
    static const char * host_data(const struct ggml_tensor * t, std::vector<char> & copy) {
        if (t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer)) {
            return static_cast<const char *>(t->data);
        }
        copy.resize(ggml_nbytes(t));
        ggml_backend_tensor_get(t, copy.data(), 0, copy.size());
        return copy.data();
    }

    static void check_finite(const std::string & name, const float * v, size_t n) {
        for (size_t i = 0; i < n; ++i) {
            if (!std::isfinite(v[i])) {
                fail("non-finite activations in %s: the model or its input is broken", name.c_str());
            }
        }
    }

    bool take(struct ggml_tensor * t) {
        const struct ggml_tensor * src0 = t->src[0];
        const struct ggml_tensor * src1 = t->src[1];
        const std::string name = weight_name(src0->name);
        if (src1->type != GGML_TYPE_F32 || src1->nb[0] != sizeof(float)) {
            fail("%s: input activations are %s with stride %zu; expected contiguous F32", name.c_str(),
                 ggml_type_name(src1->type), (size_t) src1->nb[0]);
        }
        const char * data = host_data(src1, src1_copy_);
        if (t->op == GGML_OP_MUL_MAT_ID) {
            take_routed(name, t, src0, src1, data);
        } else {
            take_dense(name, src0, src1, data);
        }
        return true;
    }

    static void accumulate(float * sum2, float * sum, const float * x, int64_t n) {
        for (int64_t j = 0; j < n; ++j) {
            sum2[j] += x[j] * x[j];
            sum[j] += x[j];
        }
    }

    // src1 is [cols, rows, (mats), (mats)]; a 3-D input against a 2-D weight is flattened.
    void take_dense(const std::string & name, const struct ggml_tensor * src0, const struct ggml_tensor * src1,
                    const char * data) {
        const int64_t ne0 = src1->ne[0];
        const int64_t n_mat = src0->ne[2] * src0->ne[3];
        Stats & e = stats_[name];
        if (e.sum2.empty()) {
            e.sum2.assign(ne0 * n_mat, 0.0f);
            e.sum.assign(ne0 * n_mat, 0.0f);
            e.counts.assign(1, 0);
        } else if (e.sum2.size() != (size_t) (ne0 * n_mat)) {
            fail("%s: inconsistent size (%zu vs %lld)", name.c_str(), e.sum2.size(), (long long) (ne0 * n_mat));
        }
        for (int64_t i3 = 0; i3 < src1->ne[3]; ++i3) {
            for (int64_t i2 = 0; i2 < src1->ne[2]; ++i2) {
                const int64_t mat = (i3 % src0->ne[3]) * src0->ne[2] + (i2 % src0->ne[2]);
                float * sum2 = e.sum2.data() + mat * ne0;
                float * sum = e.sum.data() + mat * ne0;
                for (int64_t row = 0; row < src1->ne[1]; ++row) {
                    const auto * x = reinterpret_cast<const float *>(data + row * src1->nb[1] + i2 * src1->nb[2] +
                                                                     i3 * src1->nb[3]);
                    accumulate(sum2, sum, x, ne0);
                }
            }
        }
        check_finite(name, e.sum2.data(), e.sum2.size());
        for (auto & c : e.counts) {
            c += ggml_nrows(src1) / n_mat;
        }
    }

    // ids is [n_expert_used, n_tokens] (not contiguous); src1 is [cols, n_expert_used or 1, n_tokens].
    void take_routed(const std::string & name, const struct ggml_tensor * t, const struct ggml_tensor * src0,
                     const struct ggml_tensor * src1, const char * data) {
        const struct ggml_tensor * ids = t->src[2];
        const int64_t n_as = src0->ne[2];
        const int64_t n_ids = ids->ne[0];
        const int64_t ne0 = src1->ne[0];
        const int64_t n_tokens = src1->ne[2];
        if (ids->ne[1] != n_tokens || ggml_nrows(src1) != src1->ne[1] * src1->ne[2]) {
            fail("%s: routed input has an unexpected shape", name.c_str());
        }
        ids_copy_.resize(ggml_nbytes(ids));
        ggml_backend_tensor_get(ids, ids_copy_.data(), 0, ids_copy_.size());

        Stats & e = stats_[name];
        if (e.sum2.empty()) {
            e.sum2.assign(ne0 * n_as, 0.0f);
            e.sum.assign(ne0 * n_as, 0.0f);
            e.counts.assign(n_as, 0);
        } else if (e.sum2.size() != (size_t) (ne0 * n_as) || e.counts.size() != (size_t) n_as) {
            fail("%s: inconsistent expert layout", name.c_str());
        }
        // Same visiting order as llama-imatrix (slot, then token), so float sums round alike.
        std::vector<char> touched(n_as, 0);
        for (int64_t slot = 0; slot < n_ids; ++slot) {
            for (int64_t tok = 0; tok < n_tokens; ++tok) {
                const int32_t ex = *reinterpret_cast<const int32_t *>(ids_copy_.data() + tok * ids->nb[1] +
                                                                      slot * ids->nb[0]);
                if (ex < 0 || ex >= n_as) {
                    fail("%s: routing id %d outside [0, %lld)", name.c_str(), ex, (long long) n_as);
                }
                const int64_t i11 = slot % src1->ne[1];
                const auto * x = reinterpret_cast<const float *>(data + i11 * src1->nb[1] + tok * src1->nb[2]);
                accumulate(e.sum2.data() + ex * ne0, e.sum.data() + ex * ne0, x, ne0);
                e.counts[ex]++;
                touched[ex] = 1;
            }
        }
        for (int64_t ex = 0; ex < n_as; ++ex) {
            if (touched[ex]) {
                check_finite(name, e.sum2.data() + ex * ne0, ne0);
            }
        }
    }
};

// ---------------------------------------------------------------------------------------------
// output

void write_imatrix(const std::map<std::string, Stats> & stats, const Options & o, int32_t chunk_size) {
    // The chunk count is what llama-imatrix reports: the most rows any weight saw, in whole chunks.
    int64_t max_count = 0;
    size_t data_size = 0;
    for (const auto & [name, e] : stats) {
        for (const int64_t c : e.counts) {
            max_count = std::max(max_count, c);
        }
        data_size += 2 * GGML_PAD(ggml_tensor_overhead() + sizeof(float) * e.sum2.size(), GGML_MEM_ALIGN);
        data_size += GGML_PAD(ggml_tensor_overhead() + sizeof(float) * e.counts.size(), GGML_MEM_ALIGN);
    }
    const uint32_t chunk_count = (uint32_t) (max_count / chunk_size);

    struct ggml_init_params params = { data_size + ggml_tensor_overhead(), nullptr, false };
    struct ggml_context * ctx = ggml_init(params);
    struct gguf_context * gg = gguf_init_empty();

    gguf_set_val_str(gg, "general.type", "imatrix");
    const char * dataset = o.text_file.c_str();
    gguf_set_arr_str(gg, "imatrix.datasets", &dataset, 1);
    gguf_set_val_u32(gg, "imatrix.chunk_count", chunk_count);
    gguf_set_val_u32(gg, "imatrix.chunk_size", (uint32_t) chunk_size);

    // std::map iterates in sorted name order, the order llama-imatrix writes.
    for (const auto & [name, e] : stats) {
        const int64_t n_mat = (int64_t) e.counts.size();
        const int64_t ne0 = (int64_t) e.sum2.size() / n_mat;
        struct ggml_tensor * sum2 = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ne0, n_mat);
        struct ggml_tensor * counts = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, n_mat);
        struct ggml_tensor * sum = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ne0, n_mat);
        ggml_format_name(sum2, "%s.in_sum2", name.c_str());
        ggml_format_name(counts, "%s.counts", name.c_str());
        ggml_format_name(sum, "%s.in_sum", name.c_str());
        std::memcpy(sum2->data, e.sum2.data(), ggml_nbytes(sum2));
        std::memcpy(sum->data, e.sum.data(), ggml_nbytes(sum));
        for (int64_t j = 0; j < n_mat; ++j) {
            static_cast<float *>(counts->data)[j] = (float) e.counts[j];
        }
        gguf_add_tensor(gg, sum2);
        gguf_add_tensor(gg, counts);
        gguf_add_tensor(gg, sum);
    }

    // Written beside the target and renamed, so an interrupted run never leaves a complete-looking file.
    const std::string tmp = o.out + ".partial";
    const bool ok = gguf_write_to_file(gg, tmp.c_str(), false);
    gguf_free(gg);
    ggml_free(ctx);
    if (!ok || std::rename(tmp.c_str(), o.out.c_str()) != 0) {
        std::remove(tmp.c_str());
        fail("could not write %s", o.out.c_str());
    }
    std::fprintf(stderr, "wrote %zu entries from %u chunks of %d tokens to %s\n", stats.size(), chunk_count,
                 chunk_size, o.out.c_str());
}

// ---------------------------------------------------------------------------------------------
// running the model

std::string read_text(const std::string & path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        fail("cannot read %s", path.c_str());
    }
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // llama.cpp's -f drops one trailing newline; the tokens must be the same.
    if (!text.empty() && text.back() == '\n') {
        text.pop_back();
    }
    return text;
}

std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text, bool parse_special) {
    std::vector<llama_token> tokens(text.size() + 2);
    int32_t n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), tokens.data(), (int32_t) tokens.size(),
                               true, parse_special);
    if (n == INT32_MIN) {
        fail("the text is too large to tokenize in one piece");
    }
    if (n < 0) {
        tokens.resize(-n);
        n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), tokens.data(), (int32_t) tokens.size(), true,
                           parse_special);
    }
    tokens.resize(std::max(n, 0));
    return tokens;
}

enum llama_flash_attn_type flash_attn_type(const std::string & v) {
    if (v == "on") {
        return LLAMA_FLASH_ATTN_TYPE_ENABLED;
    }
    if (v == "off") {
        return LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    return LLAMA_FLASH_ATTN_TYPE_AUTO;
}

// A CPU threadpool that lives as long as the context. Without one, ggml starts and joins its threads
// for every graph computation, and the eval callback splits each pass into one computation per matrix
// multiplication. The pool comes from the CPU backend's registry (as llama.cpp's tools get theirs), so
// no CPU-backend symbol is linked directly.
struct CpuThreadpool {
    ggml_threadpool * pool = nullptr;
    decltype(ggml_threadpool_free) * free_fn = nullptr;

    CpuThreadpool(llama_context * ctx, int n_threads) {
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (cpu == nullptr) {
            return;
        }
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(cpu);
        auto * new_fn = (decltype(ggml_threadpool_new) *) ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_new");
        free_fn = (decltype(ggml_threadpool_free) *) ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_free");
        if (new_fn == nullptr || free_fn == nullptr) {
            return;
        }
        ggml_threadpool_params params = ggml_threadpool_params_default(n_threads);
        pool = new_fn(&params);
        if (pool != nullptr) {
            llama_attach_threadpool(ctx, pool, nullptr);
        }
    }

    ~CpuThreadpool() {
        if (pool != nullptr) {
            free_fn(pool);
        }
    }
};

}  // namespace

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    const Options o = parse_args(argc, argv);

    LogFilter log_state;
    log_state.verbose = o.verbose;
    llama_log_set(log_filter, &log_state);

    const std::string text = read_text(o.text_file);

    // Like llama-imatrix: as many chunks run side by side as fit the logical batch, each in its own
    // sequence, so the physical batches (and with them the matrix multiplications) are the same.
    const int n_ctx = o.ctx;
    const int n_seq = std::max(1, o.batch / n_ctx);
    const int n_kv = n_seq * n_ctx;
    const int n_batch = std::min(o.batch, n_kv);
    if (!(n_batch < n_ctx || n_batch % n_ctx == 0)) {
        fail("--batch-size %d must be below --ctx-size %d or a multiple of it", n_batch, n_ctx);
    }

    llama_backend_init();

    Collector collector(o.process_output);

    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = o.gpu_layers;
    llama_model * model = llama_model_load_from_file(o.model.c_str(), mparams);
    if (model == nullptr) {
        fail("cannot load the model %s", o.model.c_str());
    }

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = n_kv;
    cparams.n_seq_max = n_seq;
    cparams.n_batch = n_batch;
    cparams.n_ubatch = o.ubatch;
    cparams.n_threads = o.threads;
    cparams.n_threads_batch = o.threads;
    cparams.flash_attn_type = flash_attn_type(o.flash_attn);
    cparams.swa_full = false;  // llama.cpp's tools default; the library's own default differs
    cparams.cb_eval = Collector::callback;
    cparams.cb_eval_user_data = &collector;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (ctx == nullptr) {
        fail("cannot create a context of %d tokens for %s", n_kv, o.model.c_str());
    }

    auto threadpool = std::make_unique<CpuThreadpool>(ctx, o.threads);

    const llama_vocab * vocab = llama_model_get_vocab(model);
    const bool add_bos = llama_vocab_get_add_bos(vocab);
    if (llama_pooling_type(ctx) != LLAMA_POOLING_TYPE_LAST && llama_vocab_get_add_eos(vocab)) {
        fail("the model's vocabulary appends an end-of-sequence token, which chunked collection cannot handle");
    }

    std::vector<llama_token> tokens = tokenize(vocab, text, o.parse_special);
    if ((int64_t) tokens.size() < 2 * (int64_t) n_ctx) {
        fail("%s tokenizes to %zu tokens; a context of %d needs at least %d", o.text_file.c_str(), tokens.size(),
             n_ctx, 2 * n_ctx);
    }
    const int n_chunk_max = (int) (tokens.size() / n_ctx);
    const int n_chunk = o.chunks < 0 ? n_chunk_max : std::min(o.chunks, n_chunk_max);
    const int num_batches = (n_ctx + n_batch - 1) / n_batch;
    std::fprintf(stderr, "collecting over %d chunks of %d tokens (%zu tokens in the text), %d sequences per pass\n",
                 n_chunk, n_ctx, tokens.size(), n_seq);

    // The classic llama_batch API: llama.cpp converts it to its current batch form, and older builds
    // (any tbpw supports) have it too.
    llama_batch batch = llama_batch_init(n_batch, 0, 1);
    const auto t_start = std::chrono::steady_clock::now();

    for (int i = 0; i < n_chunk; i += n_seq) {
        const int start = i * n_ctx;
        const int end = start + n_ctx;
        const int n_seq_batch = std::min(n_seq, n_chunk - i);

        llama_memory_clear(llama_get_memory(ctx), true);

        for (int j = 0; j < num_batches; ++j) {
            const int batch_start = start + j * n_batch;
            const int batch_size = std::min(end - batch_start, n_batch);
            batch.n_tokens = 0;
            for (int seq = 0; seq < n_seq_batch; ++seq) {
                const int seq_start = batch_start + seq * n_ctx;
                for (int k = 0; k < batch_size; ++k) {
                    const int idx = batch.n_tokens++;
                    // Each chunk starts with BOS in place of its first token, as llama-imatrix does.
                    batch.token[idx] = (add_bos && j == 0 && k == 0) ? llama_vocab_bos(vocab) : tokens[seq_start + k];
                    batch.pos[idx] = j * n_batch + k;
                    batch.n_seq_id[idx] = 1;
                    batch.seq_id[idx][0] = seq;
                    // Outputs for every token: otherwise the last layer skips rows the statistics need.
                    batch.logits[idx] = 1;
                }
            }
            if (llama_decode(ctx, batch) != 0) {
                fail("llama.cpp failed to evaluate chunk %d", i + 1);
            }
        }
        llama_synchronize(ctx);
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
        std::fprintf(stderr, "[%d/%d] %.2f s\n", i + n_seq_batch, n_chunk, secs);
    }

    llama_batch_free(batch);
    write_imatrix(collector.stats(), o, n_ctx);

    llama_free(ctx);
    threadpool.reset();  // after the context that uses it
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
