// infer_demo: generate text from an `ernie45 export --format aoti` directory without Python.
//
// Loads OUT/model.pt2 with libtorch's AOTInductor runtime and OUT/tokenizer.model with SentencePiece,
// applies the ERNIE chat template (or takes a raw prompt with --raw), then decodes greedily or with
// temperature / top-k / top-p sampling, streaming the text to stdout and the speed to stderr.
// Sampling reproduces ernie45's Python sampler op for op, so a --seed gives the same tokens as
// `ernie45 generate --seed`.
//
//   infer_demo OUT [--prompt TEXT] [--system TEXT] [--raw] [--max-new-tokens N] [--temperature T]
//              [--top-p P] [--top-k K] [--seed S] [--threads N] [--print-ids]

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <sentencepiece_processor.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <limits>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fs = std::filesystem;

namespace {

// A problem with the user's input: printed as one "error: ..." line, exit code 1.
struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* kUsage =
    "usage: infer_demo EXPORT_DIR [--prompt TEXT] [--system TEXT] [--raw] [--max-new-tokens N]\n"
    "                  [--temperature T] [--top-p P] [--top-k K] [--seed S] [--threads N] [--print-ids]\n"
    "\n"
    "EXPORT_DIR is the output of `ernie45 export --format aoti SRC EXPORT_DIR`. The prompt is read from\n"
    "stdin when --prompt is not given. Without sampling flags the checkpoint's generation config decides\n"
    "(greedy unless it says otherwise); --temperature 0 is greedy.\n";

struct Options {
  std::string dir;
  std::optional<std::string> prompt;
  std::optional<std::string> system;
  bool raw = false;
  int max_new_tokens = 128;
  std::optional<double> temperature;
  std::optional<double> top_p;
  std::optional<int> top_k;
  std::optional<uint64_t> seed;
  int threads = 0;
  bool print_ids = false;
};

template <typename T>
T parse_number(const std::string& flag, const std::string& text) {
  std::istringstream in(text);
  T value;
  if (!(in >> value) || !in.eof()) throw UserError(flag + " expects a number, got '" + text + "'");
  return value;
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= args.size()) throw UserError(a + " expects a value");
      return args[++i];
    };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (a == "--prompt") {
      o.prompt = value();
    } else if (a == "--system") {
      o.system = value();
    } else if (a == "--raw") {
      o.raw = true;
    } else if (a == "--max-new-tokens") {
      o.max_new_tokens = parse_number<int>(a, value());
    } else if (a == "--temperature") {
      o.temperature = parse_number<double>(a, value());
    } else if (a == "--top-p") {
      o.top_p = parse_number<double>(a, value());
    } else if (a == "--top-k") {
      o.top_k = parse_number<int>(a, value());
    } else if (a == "--seed") {
      o.seed = parse_number<uint64_t>(a, value());
    } else if (a == "--threads") {
      o.threads = parse_number<int>(a, value());
    } else if (a == "--print-ids") {
      o.print_ids = true;
    } else if (a.rfind("--", 0) == 0) {
      throw UserError("unknown option " + a + " (see --help)");
    } else if (o.dir.empty()) {
      o.dir = a;
    } else {
      throw UserError("unexpected argument '" + a + "' (see --help)");
    }
  }
  if (o.dir.empty()) throw UserError("missing EXPORT_DIR (see --help)");
  if (o.max_new_tokens < 1) throw UserError("--max-new-tokens must be >= 1");
  if (o.temperature && *o.temperature < 0) throw UserError("--temperature must be >= 0");
  if (o.top_p && (*o.top_p <= 0 || *o.top_p > 1)) throw UserError("--top-p must be in (0, 1]");
  if (o.top_k && *o.top_k < 0) throw UserError("--top-k must be >= 0");
  if (o.threads < 0) throw UserError("--threads must be >= 0");
  if (o.system && o.raw) throw UserError("--system applies to the chat template; it cannot be used with --raw");
  return o;
}

// ---- package metadata (written by ernie45.export.aoti.package_metadata) ------------------------------
class Metadata {
 public:
  explicit Metadata(std::unordered_map<std::string, std::string> map) : map_(std::move(map)) {}

  const std::string& str(const std::string& key) const {
    auto it = map_.find("ernie45." + key);
    if (it == map_.end()) throw UserError("the package has no '" + key + "' metadata: re-export it with ernie45");
    return it->second;
  }
  int64_t integer(const std::string& key) const { return std::stoll(str(key)); }
  double number(const std::string& key) const { return std::stod(str(key)); }
  std::vector<int64_t> ids(const std::string& key) const {
    std::istringstream in(str(key));
    return {std::istream_iterator<int64_t>(in), std::istream_iterator<int64_t>()};
  }

 private:
  std::unordered_map<std::string, std::string> map_;
};

// ---- tokenizer ----------------------------------------------------------------------------------------
// SentencePiece plus ERNIE's added tokens, which are matched whole in the text first (as ernie45.tokenizer
// and transformers do), and decoding that skips special tokens.
class Tokenizer {
 public:
  Tokenizer(const std::string& model_file, const Metadata& meta) {
    auto status = sp_.Load(model_file);
    if (!status.ok()) throw UserError("cannot read tokenizer " + model_file + ": " + status.ToString());
    std::istringstream lines(meta.str("added_tokens"));  // "id\ttext" per line
    for (std::string line; std::getline(lines, line);) {
      auto tab = line.find('\t');
      if (tab != std::string::npos) added_.emplace_back(line.substr(tab + 1), std::stoi(line.substr(0, tab)));
    }
    std::stable_sort(added_.begin(), added_.end(),
                     [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    for (int64_t id : meta.ids("special_token_ids")) special_.insert(static_cast<int>(id));
  }

  std::vector<int> encode(const std::string& text) const {
    std::vector<int> ids;
    std::string run;
    auto flush = [&] {
      if (run.empty()) return;
      std::vector<int> piece;
      sp_.Encode(run, &piece);
      ids.insert(ids.end(), piece.begin(), piece.end());
      run.clear();
    };
    for (size_t i = 0; i < text.size();) {
      auto hit = std::find_if(added_.begin(), added_.end(),
                              [&](const auto& tok) { return text.compare(i, tok.first.size(), tok.first) == 0; });
      if (hit != added_.end()) {
        flush();
        ids.push_back(hit->second);
        i += hit->first.size();
      } else {
        run += text[i++];
      }
    }
    flush();
    return ids;
  }

  // Special tokens are dropped; the text between them is decoded run by run, like ernie45's decode().
  std::string decode(const std::vector<int>& ids, size_t begin, size_t end) const {
    std::string out;
    std::vector<int> run;
    auto flush = [&] {
      if (run.empty()) return;
      std::string text;
      sp_.Decode(run, &text);
      out += text;
      run.clear();
    };
    for (size_t i = begin; i < end; ++i) {
      if (special_.count(ids[i])) {
        flush();
      } else if (ids[i] >= 0 && ids[i] < sp_.GetPieceSize()) {
        run.push_back(ids[i]);
      }
    }
    flush();
    return out;
  }

 private:
  sentencepiece::SentencePieceProcessor sp_;
  std::vector<std::pair<std::string, int>> added_;
  std::set<int> special_;
};

// Token ids in, finished text out: the same windowed algorithm as ernie45's IncrementalDetokenizer, so a
// character split over byte-fallback tokens is held back until complete (it decodes to U+FFFD until then).
class Detokenizer {
 public:
  explicit Detokenizer(const Tokenizer& tok) : tok_(tok) {}

  std::string add(int id) {
    ids_.push_back(id);
    std::string before = tok_.decode(ids_, prefix_, read_);
    std::string full = tok_.decode(ids_, prefix_, ids_.size());
    static const std::string kReplacement = "\xEF\xBF\xBD";
    bool unfinished = full.size() >= 3 && full.compare(full.size() - 3, 3, kReplacement) == 0;
    if (full.size() <= before.size() || unfinished) return "";
    prefix_ = read_;
    read_ = ids_.size();
    return full.substr(before.size());
  }

  std::string flush() {
    std::string before = tok_.decode(ids_, prefix_, read_);
    std::string full = tok_.decode(ids_, prefix_, ids_.size());
    prefix_ = read_ = ids_.size();
    return full.size() > before.size() ? full.substr(before.size()) : "";
  }

 private:
  const Tokenizer& tok_;
  std::vector<int> ids_;
  size_t prefix_ = 0, read_ = 0;
};

// ---- sampling (ernie45.generation.sampling, in transformers' warper order) --------------------------
struct Sampling {
  bool do_sample = false;
  double temperature = 1.0;
  int top_k = 0;
  double top_p = 1.0;
};

Sampling resolve_sampling(const Options& o, const Metadata& meta) {
  Sampling s;
  s.do_sample = meta.str("generation.do_sample") == "true";
  s.temperature = meta.number("generation.temperature");
  s.top_k = static_cast<int>(meta.integer("generation.top_k"));
  s.top_p = meta.number("generation.top_p");
  if (o.temperature) {  // the same rule as the `ernie45 generate` flags
    s.do_sample = *o.temperature > 0;
    if (s.do_sample) s.temperature = *o.temperature;
  } else if (o.top_p || o.top_k) {
    s.do_sample = true;
  }
  if (o.top_p) s.top_p = *o.top_p;
  if (o.top_k) s.top_k = *o.top_k;
  return s;
}

int64_t next_token(const at::Tensor& logits, const Sampling& s, at::Generator& gen) {
  if (!s.do_sample) return logits.argmax(-1).item<int64_t>();
  at::Tensor scores = logits;  // (1, V) fp32
  const double inf = std::numeric_limits<double>::infinity();
  if (s.temperature != 1.0) scores = scores / s.temperature;
  if (s.top_k > 0) {
    int64_t k = std::min<int64_t>(s.top_k, scores.size(-1));
    at::Tensor kth = std::get<0>(at::topk(scores, k)).narrow(-1, k - 1, 1);
    scores = scores.masked_fill(scores < kth, -inf);
  }
  if (s.top_p < 1.0) {
    auto [sorted, order] = at::sort(scores, -1, /*descending=*/false);
    at::Tensor remove = sorted.softmax(-1).cumsum(-1) <= (1 - s.top_p);
    remove.narrow(-1, -1, 1).fill_(false);  // always keep the most likely token
    remove = remove.scatter(1, order, remove);
    scores = scores.masked_fill(remove, -inf);
  }
  return at::multinomial(scores.softmax(-1), 1, false, gen).item<int64_t>();
}

// ---- the model ------------------------------------------------------------------------------------------
// One compiled step: (ids (1, S), k_cache, v_cache (L, 1, nKV, M, d), pos (1,)) -> (logits (1, V), new k, v).
class Model {
 public:
  Model(const Metadata& meta, torch::inductor::AOTIModelPackageLoader& loader)
      : loader_(loader), max_seq_len_(meta.integer("max_seq_len")) {
    auto dtype = meta.str("dtype") == "bfloat16" ? at::kBFloat16 : at::kFloat;
    std::vector<int64_t> shape = {meta.integer("num_hidden_layers"), 1, meta.integer("num_key_value_heads"),
                                  max_seq_len_, meta.integer("head_dim")};
    k_cache_ = at::zeros(shape, at::TensorOptions().dtype(dtype));
    v_cache_ = at::zeros(shape, at::TensorOptions().dtype(dtype));
  }

  int64_t max_seq_len() const { return max_seq_len_; }

  // Feed `ids` after the cached positions; returns the next-token logits (1, V) fp32.
  at::Tensor step(const std::vector<int64_t>& ids) {
    const int64_t n = static_cast<int64_t>(ids.size());
    at::Tensor input = at::tensor(ids, at::kLong).view({1, n});
    at::Tensor pos = at::full({1}, pos_, at::kLong);
    std::vector<at::Tensor> out = loader_.run({input, k_cache_, v_cache_, pos});
    k_cache_.narrow(3, pos_, n).copy_(out[1]);  // (L, 1, nKV, S, d) into slots [pos, pos + S)
    v_cache_.narrow(3, pos_, n).copy_(out[2]);
    pos_ += n;
    return out[0];
  }

 private:
  torch::inductor::AOTIModelPackageLoader& loader_;
  int64_t max_seq_len_;
  int64_t pos_ = 0;
  at::Tensor k_cache_, v_cache_;
};

std::string read_stdin_prompt() {
  if (isatty(STDIN_FILENO)) throw UserError("no prompt: pass --prompt TEXT or pipe the text on stdin");
  std::string text((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  if (!text.empty() && text.back() == '\n') text.pop_back();
  if (!text.empty() && text.back() == '\r') text.pop_back();
  return text;
}

// libtorch errors span several lines (context, frames); the first one says what went wrong.
std::string first_line(const c10::Error& e) {
  std::string what = e.what_without_backtrace();
  return what.substr(0, what.find('\n'));
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int run(int argc, char** argv) {
  Options opt = parse_args(argc, argv);
  const fs::path dir(opt.dir);
  const fs::path package = dir / "model.pt2";
  const fs::path tokenizer_file = dir / "tokenizer.model";
  if (!fs::is_directory(dir)) throw UserError("export directory not found: " + opt.dir);
  if (!fs::is_regular_file(package))
    throw UserError("package file not found: " + package.string() + " (create it with `ernie45 export --format aoti`)");
  if (!fs::is_regular_file(tokenizer_file)) throw UserError("tokenizer not found: " + tokenizer_file.string());
  std::string message = opt.prompt ? *opt.prompt : read_stdin_prompt();
  if (message.empty()) throw UserError("the prompt is empty");
  if (opt.threads > 0) at::set_num_threads(opt.threads);
  c10::InferenceMode inference_mode;

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  try {
    loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package.string(), "model");
  } catch (const c10::Error& e) {
    throw UserError("cannot load " + package.string() + ": " + first_line(e));
  }
  Metadata meta(loader->get_metadata());
  Tokenizer tok(tokenizer_file.string(), meta);
  Model model(meta, *loader);

  std::string text;
  if (opt.raw) {
    text = message;
  } else if (opt.system) {
    text = meta.str("chat.system_prefix") + *opt.system + meta.str("chat.system_between") + message +
           meta.str("chat.user_suffix");
  } else {
    text = meta.str("chat.user_prefix") + message + meta.str("chat.user_suffix");
  }
  std::vector<int> prompt = tok.encode(text);
  if (prompt.empty()) throw UserError("the prompt is empty");
  const int64_t n_prompt = static_cast<int64_t>(prompt.size());
  if (n_prompt >= model.max_seq_len())
    throw UserError("the prompt has " + std::to_string(n_prompt) + " tokens but the package's max_seq_len is " +
                    std::to_string(model.max_seq_len()) + " (re-export with a larger --max-seq-len)");
  const int64_t max_new = std::min<int64_t>(opt.max_new_tokens, model.max_seq_len() - n_prompt);
  // Raw continuation stops at EOS, like `ernie45 generate`; a chat turn also ends at <|end_of_sentence|>.
  std::vector<int64_t> stop_list = meta.ids(opt.raw ? "eos_token_ids" : "stop_token_ids");
  const std::set<int64_t> stop(stop_list.begin(), stop_list.end());
  Sampling sampling = resolve_sampling(opt, meta);
  at::Generator gen = at::detail::createCPUGenerator(opt.seed ? *opt.seed : std::random_device{}());

  Detokenizer detok(tok);
  std::vector<int64_t> generated;
  const auto t0 = std::chrono::steady_clock::now();
  double ttft = 0;
  at::Tensor logits = model.step(std::vector<int64_t>(prompt.begin(), prompt.end()));
  for (int64_t i = 0; i < max_new; ++i) {
    int64_t token = next_token(logits, sampling, gen);
    if (i == 0) ttft = seconds_since(t0);
    generated.push_back(token);
    std::cout << detok.add(static_cast<int>(token)) << std::flush;
    if (stop.count(token) || i == max_new - 1) break;
    logits = model.step({token});
  }
  const double total = seconds_since(t0);
  std::cout << detok.flush() << "\n" << std::flush;

  const size_t n = generated.size();
  char line[256];
  std::snprintf(line, sizeof line,
                "prompt: %lld tokens, first token after %.0f ms (%.1f tokens/s) | generated: %zu tokens, "
                "%.1f tokens/s",
                static_cast<long long>(n_prompt), ttft * 1000, n_prompt / std::max(ttft, 1e-9), n,
                n > 1 ? (n - 1) / std::max(total - ttft, 1e-9) : 0.0);
  std::cerr << line << "\n";
  if (opt.print_ids) {
    std::cerr << "token ids:";
    for (int64_t t : generated) std::cerr << " " << t;
    std::cerr << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UserError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  } catch (const c10::Error& e) {
    std::cerr << "error: " << first_line(e) << "\n";
    return 1;
  }
}
