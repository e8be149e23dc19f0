{{/* The release-scoped name prefix of every object. */}}
{{- define "nh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; pass (dict "ctx" $ "component" "hub"). */}}
{{- define "nh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{ include "nh.selectorLabels" . }}
{{- end -}}

{{/* The labels a component's selectors match on. */}}
{{- define "nh.selectorLabels" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference; pass (dict "ctx" $ "image" .Values.image.hub). */}}
{{- define "nh.image" -}}
{{- printf "%s%s:%s" .ctx.Values.image.registry .image.repository (toString .image.tag) -}}
{{- end -}}

{{/* The Secret reference of a key; pass (dict "name" ... "key" ... "what" "the values path"). */}}
{{- define "nh.secretRef" -}}
valueFrom:
  secretKeyRef:
    name: {{ required (printf "%s.name is required: the name of an existing Secret" .what) .name }}
    key: {{ required (printf "%s.key is required" .what) .key }}
{{- end -}}

{{/*
The Kafka security settings of one component as env entries: .ctx the root context, .prefix the
variable prefix (HUB, ORDER, ...), .hub true for the hub (its own hubSecret, when set).
*/}}
{{- define "nh.kafkaEnv" -}}
{{- $k := .ctx.Values.external.kafka -}}
{{- $protocol := $k.securityProtocol | default "plaintext" -}}
- name: {{ .prefix }}_KAFKA_SECURITY_PROTOCOL
  value: {{ $protocol | quote }}
{{- if hasPrefix "sasl_" $protocol }}
{{- $secret := $k.sasl.secret }}
{{- $what := "external.kafka.sasl.secret" }}
{{- if and .hub $k.sasl.hubSecret.name }}
{{- $secret = $k.sasl.hubSecret }}
{{- $what = "external.kafka.sasl.hubSecret" }}
{{- end }}
- name: {{ .prefix }}_KAFKA_SASL_MECHANISM
  value: {{ $k.sasl.mechanism | default "PLAIN" | quote }}
- name: {{ .prefix }}_KAFKA_SASL_USERNAME
  {{- include "nh.secretRef" (dict "what" $what "name" (required (printf "%s.name is required with external.kafka.securityProtocol %s" $what $protocol) $secret.name) "key" $secret.usernameKey) | nindent 2 }}
- name: {{ .prefix }}_KAFKA_SASL_PASSWORD
  {{- include "nh.secretRef" (dict "what" $what "name" $secret.name "key" $secret.passwordKey) | nindent 2 }}
{{- end }}
{{- if $k.caSecret.name }}
- name: {{ .prefix }}_KAFKA_SSL_CA_FILE
  value: /etc/notification-hub/kafka-ca/{{ $k.caSecret.key }}
{{- end }}
{{- end -}}

{{/* The Kafka CA bundle's volume and mount (nothing without external.kafka.caSecret.name). */}}
{{- define "nh.kafkaCaVolume" -}}
{{- with .Values.external.kafka.caSecret.name }}
- name: kafka-ca
  secret:
    secretName: {{ . }}
{{- end }}
{{- end -}}
{{- define "nh.kafkaCaMount" -}}
{{- if .Values.external.kafka.caSecret.name }}
- name: kafka-ca
  mountPath: /etc/notification-hub/kafka-ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* Checks of values that would otherwise deploy a broken system. */}}
{{- define "nh.validate" -}}
{{- $h := .Values.hub -}}
{{- $redis := or .Values.external.redis.url .Values.external.redis.urlSecret.name .Values.external.redis.clusterUrls .Values.external.redis.sentinel.urls -}}
{{- if and (not $redis) (or (gt (int $h.replicas) 1) $h.autoscaling.enabled) -}}
{{- fail "external.redis.url (or external.redis.urlSecret.name, external.redis.clusterUrls or external.redis.sentinel.urls) is required with more than one hub replica or autoscaling: without Redis each node has its own history" -}}
{{- end -}}
{{- if lt (int $h.shutdownGraceSeconds) (int $h.drainWindowSeconds) -}}
{{- fail "hub.shutdownGraceSeconds must be at least hub.drainWindowSeconds" -}}
{{- end -}}
{{- if and $h.autoscaling.enabled (lt (int $h.autoscaling.minReplicas) 2) $h.pdb.enabled -}}
{{- fail "hub.autoscaling.minReplicas must be at least 2 with the PodDisruptionBudget (one node must stay up during a disruption)" -}}
{{- end -}}
{{- end -}}
