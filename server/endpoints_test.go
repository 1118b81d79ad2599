package server_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"

	"github.com/batonhq/baton/internal/testutil"
)

// The fixtures below follow what PowerJob's worker
// (PowerJobServerDiscoveryService) sends and reads: GET
// /server/assert?appName=X and reads data as a number (or, newer, an
// object with appId); GET /server/acquire?appId=&protocol=&currentServer=
// and reads data as the address string; success false means "try the next
// server".

func TestAssertAnswersTheAppIDAsANumber(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1")
	app, _ := n.Registry().Register(context.Background(), "orders")
	w := newWorker(t)

	r := w.get(n.Addr(), "/server/assert", url.Values{"appName": {"orders"}})
	if r.status != 200 || !r.success || string(r.data) != strconv.FormatInt(app.ID, 10) {
		t.Fatalf("assert: %d %v data=%s", r.status, r.success, r.data)
	}
	r = w.get(n.Addr(), "/server/assertV2", url.Values{"appName": {"orders"}})
	var info struct {
		AppID   int64  `json:"appId"`
		AppName string `json:"appName"`
	}
	if err := json.Unmarshal(r.data, &info); err != nil || !r.success || info.AppID != app.ID || info.AppName != "orders" {
		t.Fatalf("assertV2: %v %s (%v)", r.success, r.data, err)
	}
	r = w.get(n.Addr(), "/server/assert", url.Values{"appName": {"nobody"}})
	if r.status != 200 || r.success || !strings.Contains(r.message, "app(nobody) is not registered") {
		t.Fatalf("unknown app: %d %v %q", r.status, r.success, r.message)
	}
	// A name baton could never register is simply not registered: the
	// answer PowerJob gives for an unknown app, not a 400 (which a
	// PowerJob worker takes as fatal just the same, but with no reason).
	for _, name := range []string{"a\x00b", strings.Repeat("n", 200), "\xff"} {
		r := w.get(n.Addr(), "/server/assert", url.Values{"appName": {name}})
		if r.status != 200 || r.success || !strings.Contains(r.message, "is not registered") {
			t.Errorf("assert %q: %d %v %q, want 200 and not registered", name, r.status, r.success, r.message)
		}
	}
	for _, q := range []url.Values{{}, {"appName": {""}}, {"appName": {"x", "y"}}} {
		if r := w.get(n.Addr(), "/server/assert", q); r.status != 400 || r.success || r.message == "" {
			t.Errorf("assert %v: %d %v %q, want 400", q, r.status, r.success, r.message)
		}
	}
}

func TestAcquireAnswersTheOwnersAddressAsAString(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1")
	app, _ := n.Registry().Register(context.Background(), "orders")
	w := newWorker(t)
	id := strconv.FormatInt(app.ID, 10)

	r := w.get(n.Addr(), "/server/acquire", url.Values{"appId": {id}, "protocol": {"HTTP"}})
	var addr string
	if err := json.Unmarshal(r.data, &addr); err != nil || !r.success || addr != n.Addr() {
		t.Fatalf("acquire: %d %v %s", r.status, r.success, r.data)
	}
	// With currentServer and clientVersion, as newer workers send them.
	r = w.get(n.Addr(), "/server/acquire", url.Values{"appId": {id}, "protocol": {"HTTP"}, "currentServer": {addr}, "clientVersion": {"5.1.0"}})
	if !r.success || string(r.data) != strconv.Quote(addr) {
		t.Fatalf("acquire with currentServer: %v %s", r.success, r.data)
	}
	// Domain errors: 200, success false, a message.
	for name, q := range map[string]url.Values{
		"unknown app":      {"appId": {"999"}, "protocol": {"HTTP"}},
		"unknown protocol": {"appId": {id}, "protocol": {"AKKA"}},
		"no protocol (AKKA, as PowerJob takes it)": {"appId": {id}},
	} {
		if r := w.get(n.Addr(), "/server/acquire", q); r.status != 200 || r.success || r.message == "" {
			t.Errorf("%s: %d %v %q", name, r.status, r.success, r.message)
		}
	}
	// Malformed input: 400.
	for _, q := range []url.Values{
		{"protocol": {"HTTP"}},
		{"appId": {"0"}, "protocol": {"HTTP"}},
		{"appId": {"-4"}, "protocol": {"HTTP"}},
		{"appId": {"x"}, "protocol": {"HTTP"}},
		{"appId": {"99999999999999999999"}, "protocol": {"HTTP"}},
		{"appId": {id}, "protocol": {"HT\x01TP"}},
		{"appId": {id}, "protocol": {"HTTP"}, "currentServer": {"no-port"}},
		{"appId": {id}, "protocol": {"HTTP"}, "currentServer": {"h:99999"}},
		{"appId": {id, id}, "protocol": {"HTTP"}},
	} {
		if r := w.get(n.Addr(), "/server/acquire", q); r.status != 400 || r.success {
			t.Errorf("acquire %v: %d %v %q, want 400", q, r.status, r.success, r.message)
		}
	}
}

func TestPingHelloAndMethods(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1")
	app, _ := n.Registry().Register(context.Background(), "orders")
	n.Elector().Elect(context.Background(), app.ID, "HTTP", "")
	w := newWorker(t)

	for _, method := range []string{http.MethodGet, http.MethodPost} {
		r := w.do(method, n.Addr(), "/friend/ping", nil, nil)
		var answer struct {
			ServerID  string `json:"serverId"`
			Protocols map[string]struct {
				Address string `json:"address"`
			} `json:"protocols"`
		}
		if err := json.Unmarshal(r.data, &answer); err != nil || !r.success || answer.ServerID != n.ID() || answer.Protocols["HTTP"].Address != n.Addr() {
			t.Fatalf("%s /friend/ping: %v %s", method, r.success, r.data)
		}
	}
	testutil.Eventually(t, 5e9, "the app to be owned", func() bool { return len(n.Elector().Owned()) == 1 })
	r := w.get(n.Addr(), "/server/hello", nil)
	var h struct {
		ServerID string `json:"serverId"`
		Owned    []struct {
			AppID int64 `json:"appId"`
			Token int64 `json:"token"`
		} `json:"owned"`
		Lease struct {
			Confirmed bool  `json:"confirmed"`
			TTLMillis int64 `json:"ttlMillis"`
		} `json:"lease"`
		Healthy      bool  `json:"healthy"`
		ServerTimeTs int64 `json:"serverTimeTs"`
	}
	if err := json.Unmarshal(r.data, &h); err != nil || h.ServerID != "s1" || len(h.Owned) != 1 || h.Owned[0].AppID != app.ID ||
		h.Owned[0].Token <= 0 || !h.Lease.Confirmed || h.Lease.TTLMillis != 1000 || !h.Healthy || h.ServerTimeTs == 0 {
		t.Fatalf("hello: %s (%v)", r.data, err)
	}
	if r := w.do(http.MethodPost, n.Addr(), "/server/acquire", nil, nil); r.status != http.StatusMethodNotAllowed {
		t.Errorf("POST /server/acquire: %d", r.status)
	}
}
