// Renders an Ollama TEMPLATE with Go's text/template the way Ollama's chat path feeds it
// (template.Execute with Messages): consecutive messages of one role are collated with
// "\n\n", .System is every system message joined with "\n\n", .Messages keeps them all,
// .Response is empty. Reads {"template": ..., "conversations": [[{role, content}...]...]}
// on stdin and writes a JSON list of rendered prompts. Used by tests/test_ollama_template.py.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template      string      `json:"template"`
	Conversations [][]Message `json:"conversations"`
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Parse(in.Template))
	rendered := []string{}
	for _, conv := range in.Conversations {
		system, messages := collate(conv)
		var b strings.Builder
		data := map[string]any{"System": system, "Messages": messages, "Response": "", "Prompt": ""}
		if err := tmpl.Execute(&b, data); err != nil {
			panic(err)
		}
		rendered = append(rendered, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(rendered)
}
