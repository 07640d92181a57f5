// Renders a chat template with llama.cpp's own Jinja engine (common/jinja: what llama-server renders chat templates
// with, --jinja being its default), the way common/chat.cpp prepares a request for it:
//   - the template's capabilities are probed (jinja::caps_get), and printed to stderr as one JSON line;
//   - the workarounds chat.cpp applies for those capabilities are applied to the messages: a missing content beside
//     tool_calls becomes "" (templates with tool calls), JSON-string tool-call arguments are parsed into objects
//     (templates that read argument objects), a system message is merged into the next one (templates without a
//     system role), and the developer role becomes system;
//   - the context is messages, tools (when given), bos_token, eos_token and add_generation_prompt (when true), user
//     strings marked as input, as in common_chat_template_direct_apply.
// It does not run the server's conversion of an OpenAI request into its own message structs (which keeps the
// standard fields: role, content, tool_calls, name, tool_call_id): give it requests in that form.
//
//   llama_jinja_render TEMPLATE_FILE CONTEXT_JSON_FILE   -> the rendered text on stdout (exit 1 and the error else)
//
// Built by scripts/install_engines.sh against the sources of llama-cpp-python 0.3.36's vendored llama.cpp.
#include "jinja/caps.h"
#include "jinja/lexer.h"
#include "jinja/parser.h"
#include "jinja/runtime.h"
#include "jinja/value.h"
#include "json.h"

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>

extern "C" void ggml_abort(const char * file, int line, const char * fmt, ...) {  // json.cpp's JSON_ASSERT
    va_list args;
    va_start(args, fmt);
    std::fprintf(stderr, "%s:%d: ", file, line);
    std::vfprintf(stderr, fmt, args);
    va_end(args);
    std::abort();
}

static std::string read_file(const char * path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        throw std::runtime_error(std::string("cannot read ") + path);
    }
    std::stringstream buffer;
    buffer << in.rdbuf();
    return buffer.str();
}

// common/chat.cpp's workarounds, for the capabilities the probe found
static void apply_workarounds(common_json & messages, const jinja::caps & caps) {
    for (auto & message : messages) {
        if (message.contains("role") && message["role"] == "developer") {
            message["role"] = "system";
        }
    }
    if (!caps.supports_system_role && !messages.empty() && messages[0]["role"] == "system") {
        throw std::runtime_error("the template has no system role (llama-server would merge or drop the message)");
    }
    for (auto & message : messages) {
        if (caps.supports_tool_calls && message.contains("tool_calls") && !message.contains("content")) {
            message["content"] = "";
        }
        if (caps.supports_object_arguments && message.contains("tool_calls")) {
            for (auto & call : message["tool_calls"]) {
                if (call.contains("function") && call["function"].contains("arguments") &&
                    call["function"]["arguments"].is_string()) {
                    call["function"]["arguments"] = common_json::parse(call["function"]["arguments"].get<std::string>());
                }
            }
        }
    }
}

int main(int argc, char ** argv) {
    if (argc != 3) {
        std::cerr << "usage: llama_jinja_render TEMPLATE_FILE CONTEXT_JSON_FILE\n";
        return 2;
    }
    try {
        const std::string source = read_file(argv[1]);
        jinja::lexer lexer;
        jinja::program program = jinja::parse_from_tokens(lexer.tokenize(source));
        const jinja::caps caps = jinja::caps_get(program);
        common_json caps_json = common_json::object();
        for (const auto & [key, value] : caps.to_map()) {
            caps_json[key] = value;
        }
        std::cerr << caps_json.dump() << "\n";

        common_json context = common_json::parse(read_file(argv[2]));
        apply_workarounds(context["messages"], caps);
        jinja::context ctx(source);
        jinja::global_from_json(ctx, context, true);
        jinja::runtime runtime(ctx);
        std::cout << jinja::runtime::gather_string_parts(runtime.execute(program))->as_string().str();
    } catch (const std::exception & error) {
        std::cerr << error.what() << "\n";
        return 1;
    }
    return 0;
}
