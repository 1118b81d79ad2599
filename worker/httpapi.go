package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// httpAPI speaks the server's PowerJob endpoints.
type httpAPI struct {
	client   *http.Client
	timeout  time.Duration
	tries    int
	pause    time.Duration
	protocol string
	requests func() // counts every request sent, for metrics
}

func newHTTPClient(pingTimeout time.Duration) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: pingTimeout}).DialContext,
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     90 * time.Second,
	}}
}

// errRefused: the server answered success:false (it is alive but could
// not help: unknown app, no owner, not ready).
var errRefused = errors.New("worker: server refused")

// get sends one GET to server (a base URL, "http://host:port" or
// "https://host:port") and decodes the envelope's data into out.
func (a *httpAPI) get(ctx context.Context, server, path string, q url.Values, out any) error {
	ctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	// Spaces as %20, not "+": the server reads "+" as a plus, as PowerJob
	// workers send app names unencoded.
	query := strings.ReplaceAll(q.Encode(), "+", "%20")
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, server+path+"?"+query, nil)
	if err != nil {
		return err
	}
	a.requests()
	resp, err := a.client.Do(req)
	if err != nil {
		return err
	}
	defer func() {
		// Read what is left so that the connection can be reused.
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
	}()
	var env struct {
		Success bool            `json:"success"`
		Data    json.RawMessage `json:"data"`
		Message string          `json:"message"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&env); err != nil {
		return fmt.Errorf("worker: %s%s answered %s with no ResultDTO: %w", server, path, resp.Status, err)
	}
	if !env.Success {
		if strings.Contains(env.Message, "not ready") {
			// The server's guard is unconfirmed for a moment (baton's
			// ErrNotReady): worth asking again, unlike a refusal.
			return fmt.Errorf("worker: %s%s: %s", server, path, env.Message)
		}
		return fmt.Errorf("%w: %s%s: %s", errRefused, server, path, env.Message)
	}
	if err := json.Unmarshal(env.Data, out); err != nil {
		return fmt.Errorf("worker: %s%s: data: %w", server, path, err)
	}
	return nil
}

// withTries calls f up to a.tries times, a.pause apart, until it succeeds
// or says the server refused (asking again would not change the answer).
func (a *httpAPI) withTries(ctx context.Context, f func() error) error {
	var err error
	for i := 0; i < a.tries; i++ {
		if i > 0 {
			select {
			case <-time.After(a.pause):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if err = f(); err == nil || errors.Is(err, errRefused) {
			return err
		}
	}
	return err
}

// assert resolves an app name to its id at server, accepting both the
// old answer (a number) and the newer one ({"appId":...}).
func (a *httpAPI) assert(ctx context.Context, server, appName string) (int64, error) {
	var raw json.RawMessage
	err := a.withTries(ctx, func() error {
		return a.get(ctx, server, "/server/assert", url.Values{"appName": {appName}}, &raw)
	})
	if err != nil {
		return 0, err
	}
	var id int64
	if json.Unmarshal(raw, &id) == nil && id > 0 {
		return id, nil
	}
	var info struct {
		AppID int64 `json:"appId"`
	}
	if json.Unmarshal(raw, &info) == nil && info.AppID > 0 {
		return info.AppID, nil
	}
	return 0, fmt.Errorf("worker: %s/server/assert: data %s is not an app id", server, raw)
}

// acquire asks server for the app's owner address.
func (a *httpAPI) acquire(ctx context.Context, server string, appID int64, current string) (string, error) {
	q := url.Values{"appId": {strconv.FormatInt(appID, 10)}, "protocol": {a.protocol}}
	if current != "" {
		q.Set("currentServer", current)
	}
	var addr string
	err := a.withTries(ctx, func() error { return a.get(ctx, server, "/server/acquire", q, &addr) })
	if err == nil && validHostPort(addr) != nil {
		return "", fmt.Errorf("worker: %s/server/acquire answered %q, not host:port", server, addr)
	}
	return addr, err
}
