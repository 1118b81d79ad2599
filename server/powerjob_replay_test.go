package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
)

// The replay fixture: what a PowerJob worker sends to its server list and
// how it takes each answer, per release line, from PowerJob's own source
// (powerjob-worker .../discovery/PowerJobServerDiscoveryService.java,
// powerjob-common .../utils/HttpUtils.java, JsonUtils.java):
//
//   - OkHttp GET, connect timeout 1 s, read timeout 5 s; no redirects
//     matter, no body.
//   - 4.3.9 on: GET /server/checkConnectivity?targetIp=&targetPort= first,
//     once per address (a failure only makes it pick another IP).
//   - GET /server/assert?appName= to each configured server in order,
//     3 tries 100 ms apart per server. HTTP 200 with success:true: the
//     app id (4.3.0–4.3.5: data must be a number; from 4.3.6 an object
//     {"appId"} too). success:false or any other status: fatal, the
//     worker does not start. A connection error, a timeout or an
//     unparsable body: the next server.
//   - Before 4.3.8 Jackson fails on unknown properties: an envelope with
//     any field but success, data and message does not parse.
//   - Every 10 s GET /server/acquire?protocol=&appId=&currentServer= (the
//     last only once it has a server; the query is not URL-encoded): the
//     current server's host first, then the list; success:true with a
//     string "host:port" is the new server, anything else the next one.

// pjRelease is one release line of PowerJob's worker.
type pjRelease struct {
	name              string
	numberOnlyAssert  bool // 4.3.0–4.3.5: Long.valueOf(data)
	strictEnvelope    bool // before 4.3.8: FAIL_ON_UNKNOWN_PROPERTIES
	checkConnectivity bool // 4.3.9 on
}

var pjReleases = []pjRelease{
	{name: "4.3.0-4.3.5", numberOnlyAssert: true, strictEnvelope: true},
	{name: "4.3.6-4.3.7", strictEnvelope: true},
	{name: "4.3.8"},
	{name: "4.3.9-5.1.1", checkConnectivity: true},
}

// pjOutcome is how a PowerJob worker takes one answer.
type pjOutcome string

const (
	pjAccepted pjOutcome = "accepted" // success:true with data it can read
	pjRefused  pjOutcome = "refused"  // 200, success:false: assert fails the start; acquire moves on
	pjMovesOn  pjOutcome = "moves on" // connection error, timeout, unparsable: the next server
	pjFatal    pjOutcome = "fatal"    // any other status: assert fails the start; acquire moves on
)

// pjAnswer is one request's outcome, with what the worker read.
type pjAnswer struct {
	outcome pjOutcome
	took    time.Duration
	data    json.RawMessage
	message string
	detail  string
}

// pjWorker replays a PowerJob worker's requests.
type pjWorker struct {
	t       testing.TB
	rel     pjRelease
	client  *http.Client
	servers []string // the configured server list (control addresses)
	current string   // the address the last acquire returned
}

func newPJWorker(t testing.TB, rel pjRelease, servers ...string) *pjWorker {
	tr := &http.Transport{
		DialContext:           (&net.Dialer{Timeout: time.Second}).DialContext, // connectTimeout 1 s
		ResponseHeaderTimeout: 5 * time.Second,                                 // readTimeout 5 s
		DisableCompression:    true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &pjWorker{t: t, rel: rel, client: &http.Client{Transport: tr}, servers: servers}
}

// get sends one GET as OkHttp does and classifies the answer.
func (w *pjWorker) get(server, pathAndQuery string) pjAnswer {
	start := time.Now()
	req, err := http.NewRequest(http.MethodGet, "http://"+server+pathAndQuery, nil)
	if err != nil {
		w.t.Fatal(err)
	}
	req.Header.Set("User-Agent", "okhttp/3.14.9")
	req.Header.Set("Accept-Encoding", "gzip")
	resp, err := w.client.Do(req)
	if err != nil {
		return pjAnswer{outcome: pjMovesOn, took: time.Since(start), detail: err.Error()}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	took := time.Since(start)
	if err != nil {
		return pjAnswer{outcome: pjMovesOn, took: took, detail: err.Error()}
	}
	if resp.StatusCode != http.StatusOK {
		return pjAnswer{outcome: pjFatal, took: took, detail: fmt.Sprintf("http request failed,code=%d: %s", resp.StatusCode, body)}
	}
	var env map[string]json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&env); err != nil {
		return pjAnswer{outcome: pjMovesOn, took: took, detail: "unparsable: " + err.Error()}
	}
	if w.rel.strictEnvelope {
		for k := range env {
			if k != "success" && k != "data" && k != "message" {
				return pjAnswer{outcome: pjMovesOn, took: took, detail: "unknown property " + k}
			}
		}
	}
	var success bool
	if err := json.Unmarshal(env["success"], &success); err != nil {
		return pjAnswer{outcome: pjMovesOn, took: took, detail: "success is not a boolean"}
	}
	a := pjAnswer{took: took, data: env["data"]}
	json.Unmarshal(env["message"], &a.message)
	if !success {
		a.outcome = pjRefused
		return a
	}
	a.outcome = pjAccepted
	return a
}

// assert is the worker's start: each configured server in order, three
// tries each. It returns the app id, or the outcome that ended the start.
func (w *pjWorker) assert(appName string) (int64, pjAnswer) {
	var last pjAnswer
	for _, s := range w.servers {
		for try := 0; try < 3; try++ {
			if try > 0 {
				time.Sleep(100 * time.Millisecond) // the worker's own retry pause
			}
			last = w.get(s, "/server/assert?appName="+appName)
			switch last.outcome {
			case pjRefused, pjFatal:
				return 0, last // PowerJobException: the worker does not start
			case pjAccepted:
				id, err := w.assertedID(last.data)
				if err != nil {
					last.outcome, last.detail = pjMovesOn, err.Error()
					continue
				}
				return id, last
			}
		}
	}
	return 0, last
}

// assertedID reads assert's data as the release does.
func (w *pjWorker) assertedID(data json.RawMessage) (int64, error) {
	var id int64
	if err := json.Unmarshal(data, &id); err == nil {
		return id, nil
	}
	if w.rel.numberOnlyAssert {
		return 0, fmt.Errorf("Long.valueOf(%s) fails", data)
	}
	var info struct {
		AppID *int64 `json:"appId"`
	}
	if err := json.Unmarshal(data, &info); err != nil || info.AppID == nil {
		return 0, fmt.Errorf("data %s is neither an id nor {appId}", data)
	}
	return *info.AppID, nil
}

// acquire is one discovery tick: the current server's host first, then
// the list; the first success:true with a string is the new server.
func (w *pjWorker) acquire(appID int64, protocol string) (string, []pjAnswer) {
	query := "protocol=" + protocol + "&appId=" + strconv.FormatInt(appID, 10)
	if w.current != "" {
		query += "&currentServer=" + w.current
	}
	var order []string
	if host, _, ok := strings.Cut(w.current, ":"); ok {
		for _, s := range w.servers {
			if strings.HasPrefix(s, host+":") {
				order = append(order, s)
			}
		}
	}
	order = append(order, w.servers...)
	var answers []pjAnswer
	for _, s := range order {
		a := w.get(s, "/server/acquire?"+query)
		answers = append(answers, a)
		var addr string
		if a.outcome == pjAccepted && json.Unmarshal(a.data, &addr) == nil && addr != "" {
			w.current = addr
			return addr, answers
		}
	}
	w.current = ""
	return "", answers
}

// checkConnectivity is 4.3.9's start: may the server dial the worker?
func (w *pjWorker) checkConnectivity(server, ip string, port int) pjAnswer {
	return w.get(server, fmt.Sprintf("/server/checkConnectivity?targetIp=%s&targetPort=%d", ip, port))
}

// answerBound is how long any answer may take: well under the worker's
// 5 s read timeout, with room for a loaded machine.
const answerBound = 4600 * time.Millisecond

// replayNode starts a node whose etcd client goes through a proxy, so a
// test can freeze or cut etcd under it.
func replayNode(t *testing.T, e *etcdcluster.Cluster, id string, edit ...func(*server.Config)) (*server.Node, func(string)) {
	p, url := testutil.Proxy(t, e.Endpoint(0))
	n := startNode(t, e, id, append([]func(*server.Config){func(c *server.Config) {
		c.Client = testutil.Client(t, e, url)
	}}, edit...)...)
	var once sync.Once
	heal := func() { p.UnpauseTx(); p.UnpauseRx(); p.UnblackholeTx(); p.UnblackholeRx() }
	t.Cleanup(heal)
	etcd := func(state string) {
		switch state {
		case "frozen":
			p.PauseTx()
			p.PauseRx()
		case "down":
			once.Do(func() { p.BlackholeTx(); p.BlackholeRx() })
		}
	}
	return n, etcd
}

// Every release line starts and discovers against a healthy node. Under
// a frozen or dropped etcd every answer either is accepted or makes the
// worker ask its next server, within the answer bound: none strands it (a
// fatal assert) or makes it time out. An app the node knew at Start is
// still asserted with etcd gone.
func TestPowerJobWorkerReplay(t *testing.T) {
	for _, etcdState := range []string{"healthy", "frozen", "down"} {
		t.Run("etcd "+etcdState, func(t *testing.T) {
			e := testutil.Etcd(t, 1)
			ctx := context.Background()
			registry := testutil.Must(coord.NewRegistry(e.Client(), ""))
			app, err := registry.Register(ctx, "orders")
			if err != nil {
				t.Fatal(err)
			}
			// The lookup budget is half of Answer: 1 s here, to keep the
			// frozen cases short.
			n, etcd := replayNode(t, e, "s1", func(c *server.Config) { c.HTTPTimeouts.Answer = 2 * time.Second })
			// Registered after this node started: not in its cache.
			late, err := registry.Register(ctx, "late")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := n.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
				t.Fatal(err)
			}
			etcd(etcdState)
			releases := pjReleases
			if etcdState != "healthy" {
				// What differs between releases is how answers parse,
				// checked above; the server's side does not change.
				releases = []pjRelease{pjReleases[0], pjReleases[3]}
			}
			for _, rel := range releases {
				w := newPJWorker(t, rel, n.Addr())
				if rel.checkConnectivity {
					if a := w.checkConnectivity(n.Addr(), "127.0.0.1", 1); a.outcome != pjAccepted || a.took > answerBound {
						t.Errorf("%s: checkConnectivity: %+v", rel.name, a)
					}
				}
				id, a := w.assert("orders")
				if id != app.ID || a.outcome != pjAccepted || a.took > answerBound {
					t.Errorf("%s: assert of an app known at Start: id %d, %+v; want %d accepted within %v", rel.name, id, a, app.ID, answerBound)
				}
				// An app this node has not seen yet: accepted when etcd
				// answers; else the worker must move on, never be refused.
				id, a = w.assert("late")
				switch {
				case a.took > answerBound:
					t.Errorf("%s: assert of a late app took %v", rel.name, a.took)
				case etcdState == "healthy" && (a.outcome != pjAccepted || id != late.ID):
					t.Errorf("%s: assert of a late app with etcd healthy: %d %+v", rel.name, id, a)
				case etcdState != "healthy" && a.outcome != pjMovesOn:
					t.Errorf("%s: assert of a late app with etcd %s: %+v, want the worker to move on", rel.name, etcdState, a)
				}
				// Never-registrable names are refused the PowerJob way
				// (200, success:false, a message) without etcd; an
				// unknown valid name too, when etcd answers.
				names := []string{strings.Repeat("n", 200), "a%01b"}
				if etcdState == "healthy" {
					names = append(names, "nobody")
				}
				for _, name := range names {
					if _, a := w.assert(name); a.took > answerBound || a.outcome != pjRefused || !strings.Contains(a.message, "is not registered") {
						t.Errorf("%s: assert %.20q with etcd %s: %+v", rel.name, name, etcdState, a)
					}
				}
				// Discovery ticks. The owner is this node: with etcd it
				// says so; without, its guard lapses and it says no, in
				// time, so the worker asks its next server.
				for tick := 0; tick < 3; tick++ {
					addr, answers := w.acquire(app.ID, coord.ProtocolHTTP)
					if etcdState == "healthy" && addr != n.Addr() {
						t.Errorf("%s: acquire tick %d: %q, %+v", rel.name, tick, addr, answers)
					}
					for _, a := range answers {
						if a.took > answerBound || etcdState != "healthy" && a.outcome == pjAccepted {
							t.Errorf("%s: acquire tick %d with etcd %s: %+v", rel.name, tick, etcdState, a)
						}
					}
				}
				// An app with no owner: with etcd it is elected here.
				_, answers := w.acquire(late.ID, coord.ProtocolHTTP)
				for _, a := range answers {
					if a.took > answerBound || (etcdState == "healthy") != (a.outcome == pjAccepted) {
						t.Errorf("%s: acquire of an unowned app with etcd %s: %+v", rel.name, etcdState, a)
					}
				}
			}
		})
	}
}

// Before Start a mounted node has nothing to say; a PowerJob worker must
// then ask its next server rather than fail its start.
func TestPowerJobAssertBeforeStartMovesOn(t *testing.T) {
	e := testutil.Etcd(t, 1)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := server.DefaultConfig()
	cfg.Client = e.Client()
	cfg.Control = coord.Endpoint{Address: ln.Addr().String()}
	n, err := server.NewNode(cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: n.Handler()}
	go srv.Serve(ln)
	defer srv.Close()
	for _, rel := range pjReleases {
		_, a := newPJWorker(t, rel, ln.Addr().String()).assert("orders")
		if a.outcome != pjMovesOn {
			t.Errorf("%s: assert before Start: %+v, want the worker to move on", rel.name, a)
		}
		_, answers := newPJWorker(t, rel, ln.Addr().String()).acquire(1, coord.ProtocolHTTP)
		if len(answers) != 1 || answers[0].outcome == pjAccepted {
			t.Errorf("%s: acquire before Start: %+v", rel.name, answers)
		}
	}
}

// transport is a scheduler's own transport listener: it records the
// heartbeats PowerJob's HTTP transport POSTs to it.
type transport struct {
	addr       string
	mu         sync.Mutex
	heartbeats []string
}

func startTransport(t *testing.T) *transport {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tr := &transport{addr: ln.Addr().String()}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /server/workerHeartbeat", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		tr.mu.Lock()
		tr.heartbeats = append(tr.heartbeats, string(body))
		tr.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"success":true}`)
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return tr
}

func (tr *transport) received() []string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return append([]string(nil), tr.heartbeats...)
}

// heartbeat is what PowerJob's HTTP transport sends every 10 s.
func heartbeat(t *testing.T, addr string, appID int64) (int, error) {
	body := fmt.Sprintf(`{"workerAddress":"10.0.0.7:27777","appName":"orders","appId":%d,"heartbeatTime":%d,"protocol":"HTTP","client":"baton-replay"}`, appID, time.Now().UnixMilli())
	resp, err := http.Post("http://"+addr+"/server/workerHeartbeat", "application/json", strings.NewReader(body))
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// A worker's acquire returns the owner's transport address for the
// protocol it names, never the control address; the replayed heartbeat
// reaches the scheduler's transport listener there. With two servers
// offering AKKA and HTTP each, asking the one that does not own the app
// gives the owner's addresses.
func TestAcquireSendsWorkersToTheOwnersTransport(t *testing.T) {
	e := testutil.Etcd(t, 1)
	type srv struct {
		node       *server.Node
		http, akka *transport
	}
	var servers []srv
	for _, id := range []string{"a", "b"} {
		s := srv{http: startTransport(t), akka: startTransport(t)}
		s.node = startNode(t, e, id, func(c *server.Config) {
			c.Protocols = coord.Protocols{
				coord.ProtocolHTTP: {Address: s.http.addr},
				coord.ProtocolAKKA: {Address: s.akka.addr},
			}
		})
		servers = append(servers, s)
	}
	a, b := servers[0], servers[1]
	ctx := context.Background()
	app, _ := a.node.Registry().Register(ctx, "orders")
	if _, err := a.node.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
		t.Fatal(err)
	}
	for _, rel := range pjReleases {
		for _, asked := range []srv{a, b} {
			w := newPJWorker(t, rel, asked.node.Addr())
			if got, answers := w.acquire(app.ID, coord.ProtocolHTTP); got != a.http.addr {
				t.Fatalf("%s: HTTP acquire at %s: %q, want a's HTTP transport %s (%+v)", rel.name, asked.node.ID(), got, a.http.addr, answers)
			}
			w.current = ""
			if got, answers := w.acquire(app.ID, coord.ProtocolAKKA); got != a.akka.addr {
				t.Fatalf("%s: AKKA acquire at %s: %q, want a's AKKA transport %s (%+v)", rel.name, asked.node.ID(), got, a.akka.addr, answers)
			}
		}
	}
	// The worker's next traffic goes where acquire sent it.
	if code, err := heartbeat(t, a.http.addr, app.ID); err != nil || code != 200 {
		t.Fatalf("heartbeat to the transport: %d, %v", code, err)
	}
	if got := a.http.received(); len(got) != 1 || !strings.Contains(got[0], `"appName":"orders"`) {
		t.Fatalf("transport received %q", got)
	}
	// The control address is not a transport: a heartbeat sent there is
	// refused, which is what sending workers to it used to cause.
	if code, _ := heartbeat(t, a.node.Addr(), app.ID); code != http.StatusNotFound {
		t.Errorf("heartbeat to the control address: %d, want 404", code)
	}
	// The unbracketed IPv6 currentServer PowerJob sends is read, not refused.
	w := newPJWorker(t, pjReleases[3], b.node.Addr())
	w.current = "fe80::1:10010"
	if got, answers := w.acquire(app.ID, coord.ProtocolHTTP); got != a.http.addr {
		t.Errorf("acquire with an IPv6 currentServer: %q, %+v", got, answers)
	}
}

// The election behind an acquire is bounded by HTTPTimeouts.Answer: with
// etcd frozen under the asked node, whose guard still holds for seconds
// (TTL 5 s), a worker asking for an app nobody owns is told "no" in time.
func TestAcquireAnswersWithinTheAnswerBudget(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n, etcd := replayNode(t, e, "s1", func(c *server.Config) {
		c.TTL = 5 * time.Second
		c.HTTPTimeouts.Answer = time.Second
	})
	app, err := n.Registry().Register(context.Background(), "orders")
	if err != nil {
		t.Fatal(err)
	}
	etcd("frozen")
	_, answers := newPJWorker(t, pjReleases[3], n.Addr()).acquire(app.ID, coord.ProtocolHTTP)
	if len(answers) != 1 || answers[0].outcome != pjRefused || answers[0].took > time.Second+time.Second {
		t.Errorf("acquire with etcd frozen and a 1 s budget: %+v, want refused within 2 s", answers)
	}
}
