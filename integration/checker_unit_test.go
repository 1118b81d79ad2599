package integration

import (
	"strings"
	"testing"

	"github.com/batonhq/baton/worker"
)

// The checker must be able to fail: feed it histories that break each
// guarantee.
func TestCheckerFindsOverlapsAndTokenRegressions(t *testing.T) {
	for name, tc := range map[string]struct {
		events []nodeEvent
		want   string
	}{
		"overlap": {[]nodeEvent{
			{Event: "acquire", Server: "a", App: 1, Token: 5, MonoNs: 100},
			{Event: "acquire", Server: "b", App: 1, Token: 9, MonoNs: 150},
			{Event: "end", Server: "a", App: 1, Token: 5, MonoNs: 200},
		}, "overlap"},
		"token back": {[]nodeEvent{
			{Event: "acquire", Server: "a", App: 1, Token: 9, MonoNs: 100},
			{Event: "end", Server: "a", App: 1, Token: 9, MonoNs: 120},
			{Event: "acquire", Server: "b", App: 1, Token: 5, MonoNs: 150},
		}, "follows"},
		"same token, other server": {[]nodeEvent{
			{Event: "acquire", Server: "a", App: 1, Token: 9, MonoNs: 100},
			{Event: "end", Server: "a", App: 1, Token: 9, MonoNs: 120},
			{Event: "acquire", Server: "b", App: 1, Token: 9, MonoNs: 150},
		}, "follows"},
		// A resumed server acquires token 5 again before the end of its
		// first interval with that token has been printed; then b takes
		// over. Matching ends by token alone left the first interval open
		// and reported a false overlap with b.
		"same token again, ends printed late": {[]nodeEvent{
			{Event: "acquire", Server: "a", App: 1, Token: 5, Seq: 1, MonoNs: 100},
			{Event: "acquire", Server: "a", App: 1, Token: 5, Seq: 2, MonoNs: 130},
			{Event: "end", Server: "a", App: 1, Token: 5, Seq: 1, MonoNs: 120},
			{Event: "end", Server: "a", App: 1, Token: 5, Seq: 2, MonoNs: 140},
			{Event: "acquire", Server: "b", App: 1, Token: 9, Seq: 1, MonoNs: 150},
		}, ""},
		"clean handover": {[]nodeEvent{
			{Event: "acquire", Server: "a", App: 1, Token: 5, MonoNs: 100},
			{Event: "end", Server: "a", App: 1, Token: 5, MonoNs: 120},
			{Event: "acquire", Server: "b", App: 1, Token: 9, MonoNs: 150},
			{Event: "acquire", Server: "a", App: 2, Token: 6, MonoNs: 150},
		}, ""},
	} {
		c := newChecker()
		for _, e := range tc.events {
			c.add(e)
		}
		got := strings.Join(c.verdict(), "; ")
		if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
			t.Errorf("%s: verdict %q, want %q", name, got, tc.want)
		}
	}
}

// The liveness check must be able to fail: a worker that names the
// owner's address but not its ServerID or token does not follow it, and
// a worker that returns to a deposed ownership is caught.
func TestLivenessCheckFindsStaleWorkers(t *testing.T) {
	key := ownerKey{exists: true, serverID: "b", token: 9}
	for name, tc := range map[string]struct {
		cur   worker.Server
		known bool
		want  string
	}{
		"follows":             {worker.Server{Address: "b:1", ServerID: "b", Token: 9}, true, ""},
		"no server":           {worker.Server{}, false, "has no server"},
		"old owner":           {worker.Server{Address: "a:1", ServerID: "a", Token: 5}, true, "is at a:1"},
		"address only (HTTP)": {worker.Server{Address: "b:1"}, true, "is at b:1"},
		"older token":         {worker.Server{Address: "b:1", ServerID: "b", Token: 7}, true, "token 7"},
	} {
		got := followWhy(tc.cur, tc.known, key, "b:1")
		if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
			t.Errorf("%s: %q, want %q", name, got, tc.want)
		}
	}
	if got := followWhy(worker.Server{Address: "b:1"}, true, ownerKey{}, ""); !strings.Contains(got, "cannot follow") {
		t.Errorf("no key: %q", got)
	}

	a5 := worker.Server{Address: "a:1", ServerID: "a", Token: 5}
	b9 := worker.Server{Address: "b:1", ServerID: "b", Token: 9}
	for name, tc := range map[string]struct {
		seen []worker.Server
		want string
	}{
		"moved on":             {[]worker.Server{a5, b9}, ""},
		"back to the deposed":  {[]worker.Server{a5, b9, a5}, "went back"},
		"back through HTTP":    {[]worker.Server{a5, b9, {Address: "a:1"}}, "went back"},
		"a new ownership of a": {[]worker.Server{a5, b9, {Address: "a:1", ServerID: "a", Token: 12}}, ""},
		"never moved":          {[]worker.Server{a5, {Address: "a:1"}}, ""},
	} {
		got := backToDeposed(tc.seen, "a:1", 5)
		if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
			t.Errorf("%s: %q, want %q", name, got, tc.want)
		}
	}
}
