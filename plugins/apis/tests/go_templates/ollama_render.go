// Renders Ollama chat templates with Go text/template the way Ollama's template.Execute
// does (legacy turns with the last one cut after .Response; .Messages templates in
// one go). regenerate.py runs it to write golden.json; the tests never need Go.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type Args map[string]any

func (a Args) String() string { b, _ := json.Marshal(map[string]any(a)); return string(b) }

type ToolCallFunction struct {
	Index     int  `json:"index,omitempty"`
	Name      string `json:"name"`
	Arguments Args   `json:"arguments"`
}
type ToolCall struct {
	Function ToolCallFunction `json:"function"`
}
type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
	ToolName  string     `json:"tool_name,omitempty"`
}
type ToolFunction struct {
	Name        string         `json:"name"`
	Description string         `json:"description"`
	Parameters  map[string]any `json:"parameters"`
}

func (t ToolFunction) String() string { b, _ := json.Marshal(t); return string(b) }

type Tool struct {
	Type     string       `json:"type"`
	Function ToolFunction `json:"function"`
}
func (t Tool) String() string { b, _ := json.Marshal(t); return string(b) }

type Input struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
}

var funcs = template.FuncMap{
	"json": func(v any) string { b, _ := json.Marshal(v); return string(b) },
}

func collateSystem(msgs []Message) string {
	var system []string
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
	}
	return strings.Join(system, "\n\n")
}

func deleteNode(n parse.Node, fn func(parse.Node) bool) parse.Node {
	var walk func(n parse.Node) parse.Node
	walk = func(n parse.Node) parse.Node {
		if fn(n) {
			return nil
		}
		switch t := n.(type) {
		case *parse.ListNode:
			var nodes []parse.Node
			for _, c := range t.Nodes {
				if n := walk(c); n != nil {
					nodes = append(nodes, n)
				}
			}
			t.Nodes = nodes
			return t
		case *parse.IfNode:
			t.BranchNode = *(walk(&t.BranchNode).(*parse.BranchNode))
		case *parse.WithNode:
			t.BranchNode = *(walk(&t.BranchNode).(*parse.BranchNode))
		case *parse.RangeNode:
			t.BranchNode = *(walk(&t.BranchNode).(*parse.BranchNode))
		case *parse.BranchNode:
			t.List = walk(t.List).(*parse.ListNode)
			if t.ElseList != nil {
				if l := walk(t.ElseList); l != nil {
					t.ElseList = l.(*parse.ListNode)
				} else {
					t.ElseList = nil
				}
			}
		case *parse.ActionNode:
			n := walk(t.Pipe)
			if n == nil {
				return nil
			}
			t.Pipe = n.(*parse.PipeNode)
		case *parse.PipeNode:
			var commands []*parse.CommandNode
			for _, c := range t.Cmds {
				var args []parse.Node
				for _, a := range c.Args {
					if n := walk(a); n != nil {
						args = append(args, n)
					}
				}
				if len(args) == 0 {
					return nil
				}
				c.Args = args
				commands = append(commands, c)
			}
			if len(commands) == 0 {
				return nil
			}
			t.Cmds = commands
		}
		return n
	}
	return walk(n)
}

func render(in Input) (string, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		return "", err
	}
	var b bytes.Buffer
	system := collateSystem(in.Messages)
	usesMessages := strings.Contains(in.Template, ".Messages")
	if usesMessages {
		err = tmpl.Execute(&b, map[string]any{"System": system, "Messages": in.Messages, "Tools": in.Tools, "Response": "", "Prompt": ""})
		return b.String(), err
	}
	var prompt, response string
	for _, m := range in.Messages {
		execute := func() error {
			if err := tmpl.Execute(&b, map[string]any{"System": system, "Prompt": prompt, "Response": response}); err != nil {
				return err
			}
			system, prompt, response = "", "", ""
			return nil
		}
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := execute(); err != nil {
					return "", err
				}
			}
			system = m.Content
		case "user":
			if response != "" {
				if err := execute(); err != nil {
					return "", err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	var cut bool
	nodes := deleteNode(tmpl.Root.Copy(), func(n parse.Node) bool {
		if field, ok := n.(*parse.FieldNode); ok && containsStr(field.Ident, "Response") {
			cut = true
			return false
		}
		return cut
	})
	tree := parse.Tree{Root: nodes.(*parse.ListNode)}
	t2 := template.Must(template.New("").Funcs(funcs).AddParseTree("", &tree))
	err = t2.Execute(&b, map[string]any{"System": system, "Prompt": prompt, "Response": response})
	return b.String(), err
}

func main() {
	var cases []Input
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var out []string
	for _, c := range cases {
		s, err := render(c)
		if err != nil {
			s = "ERROR: " + err.Error()
		}
		out = append(out, s)
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
}

func containsStr(xs []string, x string) bool { for _, v := range xs { if v == x { return true } }; return false }
